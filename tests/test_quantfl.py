"""QuantFL: n-bit uploads that are really n-bit on the wire, bits=32 is FedAvg, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslim.algorithms.quantfl import QuantFL, QuantFLParams
from fedslim.codecs import CodecContext, ExactCodec, Pipeline, float32_size
from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner


def _cfg(tiny_cfg: dict, name: str, algo: dict) -> dict:
    cfg = dict(tiny_cfg, name=name)
    cfg["model"] = {"name": "mlp", "options": {"norm": "none"}}
    cfg["codec"] = {"targets": "weights_and_biases"}
    cfg["algorithm"] = algo
    return cfg


def _rows(tiny_cfg: dict, name: str) -> list[dict]:
    path = Path(tiny_cfg["output_dir"]) / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_uploads_shrink_with_bits_and_match_the_codec_stats(tiny_cfg: dict) -> None:
    sizes = {}
    for bits in (32, 8, 4):
        name = f"q{bits}"
        Runner(validate(_cfg(tiny_cfg, name, {"name": "quantfl", "params": {"bits": bits}}))).run()
        rows = _rows(tiny_cfg, name)
        for r in rows:
            per_client = [v for c in r["comm"] for v in c["bytes_up"].values()]
            # the logged codec statistics describe exactly the payloads that were counted
            assert r["codec_up"]["bytes"] == r["bytes_up"] == sum(per_client)
            assert r["codec_up"]["payloads"] == len(per_client)
            assert r["codec_up"]["bits"] == [bits]
        sizes[bits] = (sum(r["bytes_up"] for r in rows), sum(r["codec_up"]["float32_bytes"] for r in rows))
    total32, f32 = sizes[32]
    assert total32 == f32  # 32 bits = float32 on the wire, nothing else
    for bits, need in ((8, 3.9), (4, 7.5)):
        assert sizes[bits][1] == f32  # same tensors uploaded, whatever the bits
        assert f32 / sizes[bits][0] >= need, (bits, f32 / sizes[bits][0])


def test_bits_32_is_exactly_fedavg(tiny_cfg: dict) -> None:
    Runner(validate(_cfg(tiny_cfg, "fedavg", {"name": "fedavg"}))).run()
    Runner(validate(_cfg(tiny_cfg, "q32", {"name": "quantfl", "params": {"bits": 32}}))).run()
    a, b = _rows(tiny_cfg, "fedavg"), _rows(tiny_cfg, "q32")
    for ra, rb in zip(a, b, strict=True):
        assert ra["eval"] == rb["eval"]
        assert ra["bytes_up"] == rb["bytes_up"]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_the_server_receives_values_on_an_n_bit_grid(bits: int, rounding: str) -> None:
    algo = QuantFL.__new__(QuantFL)
    algo.params = QuantFLParams(bits=bits, rounding=rounding)
    codec = algo.uplink_codec()
    assert isinstance(codec, Pipeline)
    gen = torch.Generator().manual_seed(0)
    delta = {"fc.weight": torch.randn(64, 50, generator=gen) * 1e-2, "fc.bias": torch.randn(64, generator=gen),
             "bn.num_batches_tracked": torch.tensor(7)}
    ctx = CodecContext("up", 3, 1, frozenset({"fc.weight"}), torch.Generator().manual_seed(1))
    payload = codec.encode(delta, ctx)
    out = codec.decode(payload, ctx)
    # at most 2^n - 1 symmetric levels (zero included) per tensor; untouched tensors are bit-exact
    assert len(np.unique(out["fc.weight"].numpy())) <= 2 ** bits - 1
    assert torch.equal(out["fc.bias"], delta["fc.bias"])
    assert torch.equal(out["bn.num_batches_tracked"], delta["bn.num_batches_tracked"])
    # and the bytes are packed codes: n bits per weight plus small per-tensor overhead
    assert len(payload) < float32_size(delta) - 3200 * (32 - bits) / 8 + 200
    err = (out["fc.weight"] - delta["fc.weight"]).abs().max()
    step = 2 * delta["fc.weight"].abs().max() / (2 ** bits - 2)
    assert err <= step * (1.0 if rounding == "stochastic" else 0.5) + 1e-7


def test_stochastic_rounding_is_unbiased_on_average() -> None:
    algo = QuantFL.__new__(QuantFL)
    algo.params = QuantFLParams(bits=2, rounding="stochastic")
    codec = algo.uplink_codec()
    x = {"w": torch.linspace(-1, 1, 201).reshape(201, 1).repeat(1, 1000)}
    ctx = CodecContext("up", 0, 1, frozenset({"w"}), torch.Generator().manual_seed(5))
    out = codec.decode(codec.encode(x, ctx), ctx)["w"]
    # with 2 bits the grid is {-1, 0, 1}: nearest rounding would make 0.3 into 0, stochastic averages to 0.3
    assert torch.allclose(out.mean(1), x["w"][:, 0], atol=0.08)


def test_bits_32_installs_no_quantizer() -> None:
    algo = QuantFL.__new__(QuantFL)
    algo.params = QuantFLParams(bits=32)
    assert isinstance(algo.uplink_codec(), ExactCodec)


def test_config_errors_name_the_field(tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "x", {"name": "quantfl", "params": {"bits": 8}})
    cfg["codec"] = {"up": [{"name": "topk", "ratio": 0.1}]}
    with pytest.raises(ConfigError, match=r"^codec\.up: QuantFL installs its own"):
        validate(cfg)
    for bad in (17, 0, True, 3.5):
        with pytest.raises(ConfigError, match=r"algorithm\.params\.bits"):
            validate(_cfg(tiny_cfg, "x", {"name": "quantfl", "params": {"bits": bad}}))
    with pytest.raises(ConfigError, match=r"algorithm\.params\.rounding"):
        validate(_cfg(tiny_cfg, "x", {"name": "quantfl", "params": {"rounding": "floor"}}))


@pytest.mark.parametrize("bad,shown", [(0, "0"), (17, "17"), (True, "True"), ("8", "'8'")])
def test_bad_bits_message_shows_the_value_once(tiny_cfg: dict, bad: object, shown: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(_cfg(tiny_cfg, "x", {"name": "quantfl", "params": {"bits": bad}}))
    assert str(e.value) == ("algorithm.params.bits: must be an integer from 1 to 16, or 32 for no quantization "
                            f"(got {shown})")


def test_the_update_is_quantized_not_the_weights(tiny_cfg: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the uplink quantizer encodes is local minus received weights, and the server adds the mean of
    what it decodes to the global model (FedAvg on quantized deltas), not a mean of quantized weights."""
    cfg = _cfg(tiny_cfg, "delta", {"name": "quantfl", "params": {"bits": 4, "rounding": "nearest"}})
    seen: list[tuple[dict, dict]] = []  # (what the client encoded, what the server decoded)
    encode, decode, aggregate = Pipeline.encode, Pipeline.decode, QuantFL.aggregate

    def record_encode(self: Pipeline, tensors: dict, ctx: CodecContext) -> bytes:
        seen.append(({k: v.clone() for k, v in tensors.items()}, {}))
        return encode(self, tensors, ctx)

    def record_decode(self: Pipeline, payload: bytes, ctx: CodecContext | None = None) -> dict:
        out = decode(self, payload, ctx)
        seen[-1][1].update({k: v.clone() for k, v in out.items()})
        return out

    before: list[dict] = []

    def record_aggregate(self: QuantFL, round_: int, tasks: list, results: list) -> dict:
        before.append({k: v.clone() for k, v in self.state.items()})
        start = len(seen) - len(results)
        out = aggregate(self, round_, tasks, results)
        n = torch.tensor([float(r.num_samples) for r in results], dtype=torch.float64)
        for k, v in self.state.items():
            if v.is_floating_point():  # the global model moved by the weighted mean of the decoded deltas
                mean = sum(w * seen[start + i][1][k].double() for i, w in enumerate((n / n.sum()).tolist()))
                assert torch.allclose(v.double() - before[-1][k].double(), mean, atol=1e-6), k
        return out

    monkeypatch.setattr(Pipeline, "encode", record_encode)
    monkeypatch.setattr(Pipeline, "decode", record_decode)
    monkeypatch.setattr(QuantFL, "aggregate", record_aggregate)
    Runner(validate(cfg)).run()
    assert seen and len(before) == tiny_cfg["federation"]["rounds"]
    big = next(k for k, v in before[0].items() if v.dim() == 2)
    for _sent, got in seen:
        assert len(torch.unique(got[big])) <= 2 ** 4 - 1  # on the 4-bit grid
    # one epoch's update is far smaller than the weights themselves: it is the delta that was encoded
    assert seen[0][0][big].abs().max() < 0.5 * before[0][big].abs().max()
