"""What a pipeline stage is: a value transform over the compressible tensors of one payload.

Stages run in order on :class:`Work` items (one per compressible tensor). Sparsifying stages set
elements to exactly zero; quantizing stages snap the nonzero elements to a grid and record the codes.
The wire encoding (:mod:`fedslim.codecs.wire`) is chosen afterwards from what the stages left, so
``prune -> quantize`` and ``quantize -> prune`` both encode pruned zeros by position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, create_model, field_validator

from fedslim.codecs.base import CodecContext
from fedslim.codecs.grid import Grid
from fedslim.config import format_validation_error


@dataclass
class Work:
    """One compressible tensor on its way through the stages."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: np.ndarray  # flat float64; an exact 0 is an element the wire format need not carry
    grid: Grid | None = None  # set by quantizing stages: nonzero values are grid.dequant(codes)
    codes: np.ndarray | None = None  # flat int64, meaningful where values != 0

    @staticmethod
    def of(name: str, t: torch.Tensor) -> Work:
        t = t.detach().cpu()
        if t.dtype in (torch.float32, torch.float16, torch.float64):
            flat = t.numpy().astype(np.float64).reshape(-1)  # astype copies: the caller's tensor is safe
        else:
            flat = t.to(torch.float64).reshape(-1).numpy().copy()
        return Work(name, tuple(t.shape), t.dtype, flat)

    @property
    def numel(self) -> int:
        return int(self.values.size)

    def zero_out(self, drop: np.ndarray) -> None:
        """Set the ``drop`` positions to zero; the codes of the survivors stay valid."""
        self.values[drop] = 0.0

    def replace(self, values: np.ndarray) -> None:
        """New values not on any grid (the codes no longer describe them)."""
        self.values, self.grid, self.codes = values, None, None


@dataclass
class Report:
    """What the stages of one encode did, for ``Codec.last_stats``."""

    nominal_sparsity: float | None = None
    rounding_zeros: int = 0
    bits: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def ask_sparsity(self, s: float) -> None:
        self.nominal_sparsity = s if self.nominal_sparsity is None else max(self.nominal_sparsity, s)


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1: ``bits: true`` or ``amount: yes`` is a config slip, not a number.
        ann = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(v, bool) and ann in (int, float):
            raise ValueError("must be a number, not a boolean")
        return v


class Stage:
    """Base class of the stages registered in :data:`fedslim.registry.CODECS`."""

    name: ClassVar[str] = "stage"
    Params: ClassVar[type[StageParams]] = StageParams
    quantizes: ClassVar[bool] = False  # snaps values to a grid; a pipeline takes at most one such stage

    def __init__(self, params: StageParams | None = None, **fields: Any):
        self.params = params if params is not None else self.Params(**fields)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], field: str) -> Stage:
        fields = {k: v for k, v in spec.items() if k != "name"}
        try:
            return cls(cls.Params.model_validate(fields))
        except ValidationError as e:
            raise ValueError(format_params_error(e, cls.Params, field)) from None

    @property
    def needs_generator(self) -> bool:
        return False

    def apply(self, works: list[Work], ctx: CodecContext, report: Report) -> None:
        raise NotImplementedError

    def conflict_after_quantizer(self) -> str | None:
        """Why this stage cannot follow a quantizing stage, or None when it leaves the grid values alone."""
        return "it would quantize already-quantized values again" if self.quantizes else None

    def conflict_on_downlink(self) -> str | None:
        """Why this stage cannot run in ``codec.down`` (which sends the global model itself, not an
        update), or None."""
        return None

    def finish(self, works: list[Work], decoded: dict[str, np.ndarray], ctx: CodecContext) -> None:
        """Called with the values the receiver will decode (flat float64), once the bytes exist."""

    def restrict_memory(self, masks: dict[str, torch.Tensor], forget: bool = False) -> None:
        """Weights fixed at zero from now on (``masks``: 0/1 per tensor name), or, with ``forget``, updates
        never to be sent: what a stage remembers between payloads (error feedback) drops them."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return f"{self.name}({fields})" if fields else self.name


@functools.cache
def _spec_model(params: type[BaseModel]) -> type[BaseModel]:
    """``params`` plus ``name``: the keys a stage's mapping may hold (for the list of valid keys)."""
    return create_model(f"{params.__name__}Spec", __base__=params, name=(str, ...))


def format_params_error(e: ValidationError, model: type[BaseModel], field: str) -> str:
    """First error of ``e`` as one line starting with the field path; an unknown key comes first, as it
    is most likely the misspelling of a required key that is also reported missing."""
    errors = e.errors()
    extra = [err for err in errors if err["type"] == "extra_forbidden"]
    if extra:
        only = ValidationError.from_exception_data(
            e.title, [{"type": "extra_forbidden", "loc": extra[0]["loc"], "input": extra[0]["input"]}])
        return format_validation_error(only, _spec_model(model), f"{field}.")
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{field}.{loc}" if loc else field
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {msg} (got {err['input']!r})" if loc else f"{where}: {msg}"
