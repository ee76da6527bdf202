"""A codec made of stages, built from config, and the data-free ``compress_state`` API.

``build_pipeline([{name: prune, amount: 0.5}, {name: int8}], field="codec.down")`` validates each
stage's fields (one pydantic model per stage, unknown keys rejected), refuses orders that undo a
quantizer (:func:`check_order`) and returns a :class:`Pipeline`.
Encoding runs the stages in order on the tensors named in ``ctx.compressible`` (floating point only),
then writes every tensor in the format of :mod:`fedslim.codecs.wire`; every other tensor travels
raw and bit-exact.

After each ``encode``, ``codec.last_stats`` holds: ``bytes`` (= ``len(payload)``), ``float32_bytes``
(the ExactCodec size with floats as float32) and ``ratio_vs_float32``; ``bits`` (of the last
quantizing stage, 32 if none); ``nominal_sparsity`` (the largest requested by prune / top-k, None if
none) and ``measured_sparsity`` (zeros the receiver decodes, over all compressed elements);
``rounding_zeros`` (nonzeros that quantization rounded to 0); ``compressed_numel``; and ``tensors``:
per tensor its ``mode`` (raw, dense, bitmap, varint), ``values``, ``bits``, ``nnz``, ``groups``, ``bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fedslim.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    ExactCodec,
    State,
    check_finite,
    float32_size,
)
from fedslim.codecs.prune import weight_names
from fedslim.codecs.stage import Report, Stage, Work
from fedslim.codecs.wire import VERSION, encode_raw, encode_work, payload_header, read_record, to_tensor
from fedslim.registry import CODECS, UnknownNameError


class Pipeline(Codec):
    """Stages applied in order to the compressible tensors, then one compact wire encoding."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.stages = list(stages)
        self.name = " -> ".join(s.describe() for s in self.stages) or "exact"

    def encode(self, tensors: State, ctx: CodecContext) -> bytes:
        check_finite(tensors, ctx)
        works = {name: Work.of(name, t) for name, t in tensors.items()
                 if name in ctx.compressible and t.is_floating_point()}
        report = Report()
        for stage in self.stages:
            stage.apply(list(works.values()), ctx, report)
        parts = [payload_header(len(tensors))]
        decoded: dict[str, np.ndarray] = {}
        per_tensor: dict[str, dict[str, Any]] = {}
        zeros = numel = 0
        for name, t in tensors.items():
            w = works.get(name)
            if w is None:
                rec = encode_raw(name, t)
                per_tensor[name] = {"mode": "raw", "bytes": len(rec)}
            else:
                c = encode_work(w)
                rec = c.record
                received = to_tensor(c.decoded, w.dtype, w.shape)
                decoded[name] = (received.numpy() if received.dtype != torch.bfloat16
                                 else received.to(torch.float64).numpy()).astype(np.float64).reshape(-1)
                zeros += int(np.count_nonzero(decoded[name] == 0))
                numel += w.numel
                per_tensor[name] = {"mode": c.positions, "values": c.values, "bits": c.bits, "nnz": c.nnz,
                                    "numel": w.numel, "groups": c.groups, "bytes": len(rec)}
            parts.append(rec)
        for stage in self.stages:
            stage.finish(list(works.values()), decoded, ctx)
        payload = b"".join(parts)
        f32 = float32_size(tensors)
        self.last_stats = {
            "codec": self.name, "bytes": len(payload), "float32_bytes": f32,
            "ratio_vs_float32": f32 / len(payload), "bits": report.bits,
            "nominal_sparsity": report.nominal_sparsity,
            "measured_sparsity": zeros / numel if numel else 0.0,
            "rounding_zeros": report.rounding_zeros, "compressed_numel": numel,
            "tensors": per_tensor, **report.extra}
        return payload

    def decode(self, payload: bytes, ctx: CodecContext | None = None) -> State:
        mv = memoryview(payload)
        if len(mv) < 5 or mv[0] != VERSION:
            raise CodecError(f"not a fedslim pipeline payload (version byte {mv[0] if len(mv) else None})")
        count = int.from_bytes(mv[1:5], "little")
        off = 5
        out: State = {}
        for _ in range(count):
            name, t, off = read_record(mv, off)
            out[name] = t
        if off != len(mv):
            raise CodecError(f"payload has {len(mv) - off} trailing bytes")
        return out

    def restrict_memory(self, masks: dict[str, torch.Tensor], forget: bool = False) -> None:
        for s in self.stages:
            s.restrict_memory(masks, forget)

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stages = state.get("stages", [])
        if len(stages) != len(self.stages):
            raise ValueError(f"codec state has {len(stages)} stages, this pipeline {len(self.stages)}")
        for s, st in zip(self.stages, stages, strict=True):
            s.load_state_dict(st)


def build_stage(spec: dict[str, Any] | Stage, field: str) -> Stage:
    if isinstance(spec, Stage):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"{field}: a stage is a mapping with a 'name' (got {spec!r})")
    if "name" not in spec:
        raise ValueError(f"{field}: missing 'name'; allowed: {', '.join(CODECS.names())}")
    if not isinstance(spec["name"], str):
        raise ValueError(f"{field}.name: must be a string (got {spec['name']!r})")
    try:
        cls = CODECS.get(spec["name"], field=f"{field}.name")
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    return cls.from_spec(spec, field)


def check_order(stages: list[Stage], field: str) -> None:
    """Refuse stages that undo a quantizer: a second quantizer re-quantizes its values (the first one's
    error stays, its bits never reach the wire), and top-k error feedback takes them off the grid."""
    first = next((i for i, s in enumerate(stages) if s.quantizes), None)
    if first is None:
        return
    for i in range(first + 1, len(stages)):
        why = stages[i].conflict_after_quantizer()
        if why is not None:
            q = stages[first].name
            raise ValueError(f"{field}.{i}: {stages[i].name} cannot follow {q} ({field}.{first}): {why}; a "
                             f"pipeline takes one quantizing stage (quantize or int8), and after it only "
                             f"prune, or topk with error_feedback: false")


def check_downlink(stages: list[Stage], field: str) -> None:
    """Refuse stages that only make sense on updates: the downlink encodes the global model itself."""
    for i, s in enumerate(stages):
        why = s.conflict_on_downlink()
        if why is not None:
            raise ValueError(f"{field}.{i}: {s.name} cannot run on the downlink this way: {why}")


def build_pipeline(specs: Iterable[dict[str, Any] | Stage] | None, field: str = "codec", *,
                   downlink: bool = False) -> Codec:
    """Config stages -> codec. Errors are ``ValueError`` starting with the field path. ``downlink``: the
    codec will encode the global model itself, not updates (``codec.down``)."""
    stages = [build_stage(s, f"{field}.{i}") for i, s in enumerate(specs or [])]
    check_order(stages, field)
    if downlink:
        check_downlink(stages, field)
    return Pipeline(stages) if stages else ExactCodec()


def compress_state(state: State, stages: Iterable[dict[str, Any] | Stage] | Codec,
                   compressible: Iterable[str] | None = None, generator: torch.Generator | None = None,
                   client: int = -1, round_: int = 0) -> tuple[bytes, State, dict[str, Any]]:
    """Compress a whole state dict without data (HybridCompFL's server-side compression).

    Returns the payload, the state the receiver decodes from it (decoded from the bytes, so what a
    device would run) and the codec's statistics. ``compressible`` defaults to :func:`weight_names`.
    """
    codec = stages if isinstance(stages, Codec) else build_pipeline(list(stages), "stages")
    names = weight_names(state) if compressible is None else frozenset(compressible)
    ctx = CodecContext("down", client, round_, names, generator)
    payload = codec.encode(state, ctx)
    return payload, codec.decode(payload, ctx), dict(codec.last_stats)
