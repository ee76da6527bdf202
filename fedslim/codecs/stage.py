"""What a pipeline stage is: a value transform over the compressible tensors of one payload.

Stages run in order on :class:`Work` items (one per compressible tensor). Sparsifying stages set
elements to exactly zero; quantizing stages snap the nonzero elements to a grid and record the codes.
The wire encoding (:mod:`fedslim.codecs.wire`) is chosen afterwards from what the stages left, so
``prune -> quantize`` and ``quantize -> prune`` both encode pruned zeros by position.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from fedslim.codecs.base import CodecContext
from fedslim.codecs.grid import Grid


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

    def finish(self, works: list[Work], decoded: dict[str, np.ndarray], ctx: CodecContext) -> None:
        """Called with the values the receiver will decode (flat float64), once the bytes exist."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return f"{self.name}({fields})" if fields else self.name


def format_params_error(e: ValidationError, model: type[BaseModel], field: str) -> str:
    """First error of ``e`` as one line starting with the field path."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    allowed = list(model.model_fields)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{field}: unknown key '{loc}'{hint}; allowed: {', '.join(['name', *allowed])}"
    where = f"{field}.{loc}" if loc else field
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {msg} (got {err['input']!r})" if loc else f"{where}: {msg}"
