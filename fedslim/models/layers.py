"""Pieces shared by the model families: width scaling, HeteroFL's Scaler, norm layers, option parsing.

Conventions every family follows (other packages rely on them):

* A hidden channel/unit count at width ``w`` is ``ceil(base * w)`` and never below 1 (HeteroFL's
  ``int(np.ceil(rate * x))``); input channels and the classifier's outputs never scale.
* Parameter and buffer *names* never depend on the width, and neither does the presence of a layer:
  anything whose existence depends on channel counts (a shortcut projection, a residual add) is
  decided from the width-1 counts. HeteroFL-style algorithms slice the global state dict to the
  sub-model's shapes by name.
* Modules without parameters (Scaler, Dropout, an Identity standing in for ``norm="none"``) are
  always present, so the numbering inside ``nn.Sequential`` containers is the same for every option
  value too, except that ``norm="none"`` drops the norm's parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

NORMS = ("bn", "gn", "none")
# GroupNorm groups: HeteroFL uses GroupNorm(4, C); gcd keeps that wherever C allows and still
# builds for narrow widths where C is not a multiple of 4.
GN_GROUPS = 4


def scaled(base: int, width: float) -> int:
    """Channel count of a hidden layer with ``base`` channels at width ``width`` (≥ 1).

    The product is rounded to 9 decimals before the ceiling: in binary floating point
    ``0.55 * 200`` is ``110.00000000000001`` and ``0.07 * 100`` is ``7.000000000000001``, which a bare
    ``ceil`` turns into one channel more than ``ceil(base * width)``. Widths that are exact binary
    fractions (HeteroFL's 1, 1/2, ..., 1/16) are unaffected.
    """
    return max(1, int(math.ceil(round(width * base, 9))))


class Scaler(nn.Module):
    """HeteroFL's Scaler: divides by ``rate`` in training mode, identity in eval mode.

    A sub-model of width ``rate`` trained alone has activations about ``rate`` times those of the
    full model; dividing during local training makes the sub-model's weights fit the full model
    they are averaged into. It holds no parameters or buffers, so state dicts are unaffected.
    """

    def __init__(self, rate: float = 1.0):
        super().__init__()
        if not rate > 0:
            raise ValueError(f"Scaler rate must be > 0, got {rate}")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.rate != 1.0:
            return x / self.rate
        return x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def set_scaler_rate(model: nn.Module, rate: float) -> nn.Module:
    """Set the rate of every :class:`Scaler` in ``model`` (in place); returns ``model``."""
    if not rate > 0:
        raise ValueError(f"Scaler rate must be > 0, got {rate}")
    for m in model.modules():
        if isinstance(m, Scaler):
            m.rate = float(rate)
    return model


def make_norm(kind: str, channels: int, *, track_running_stats: bool = True, dim: int = 2) -> nn.Module:
    """A normalisation layer over ``channels`` features; ``dim`` is 2 for NCHW maps, 1 for (N, C)."""
    if kind == "bn":
        bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        return bn(channels, track_running_stats=track_running_stats)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(channels, GN_GROUPS), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'; allowed: {', '.join(NORMS)}")


def batch_norms(model: nn.Module) -> Iterable[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(qualified name, module) of every batch-norm layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield name, m


def set_bn_tracking(model: nn.Module, track: bool) -> nn.Module:
    """Switch every BatchNorm layer of ``model`` between the two HeteroFL modes (in place).

    ``track=False`` is HeteroFL's static BN: batch statistics in train *and* eval mode, and no
    running buffers in the state dict. ``track=True`` (re)creates the buffers as fresh statistics
    (mean 0, var 1, count 0) so the server can install aggregated statistics with
    ``load_state_dict`` before evaluating. Layers already in the requested mode are left untouched,
    so existing statistics survive a no-op switch. Returns ``model``.
    """
    for _, m in batch_norms(model):
        if m.track_running_stats == track:
            continue
        m.track_running_stats = track
        if track:
            ref = m.weight
            kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
            m.register_buffer("running_mean", torch.zeros(m.num_features, **kw))
            m.register_buffer("running_var", torch.ones(m.num_features, **kw))
            m.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=kw.get("device")),
            )
        else:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return model


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-out) convolutions as in the HeteroFL/torchvision reference code, zero
    biases, unit/zero norm affine; linear weights keep PyTorch's default initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --- arguments and options ---------------------------------------------------------------------

COMMON_OPTIONS: dict[str, Any] = {
    "norm": "bn",
    "track_running_stats": True,
    "scaler_rate": 1.0,
    "dropout": 0.0,
}


def check_common_args(model: str, num_classes: int, width: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"model '{model}': num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not (width > 0 and math.isfinite(width)):
        raise ValueError(f"model.width: must be a finite number > 0 for model '{model}', got {width!r}")


def parse_options(model: str, options: Mapping[str, Any], defaults: Mapping[str, Any],
                  norms: tuple[str, ...] = NORMS) -> dict[str, Any]:
    """Merge ``options`` over ``defaults``, rejecting unknown names and checking the common ones."""
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise ValueError(f"model.options: unknown option '{unknown[0]}' for model '{model}'; "
                         f"allowed: {', '.join(sorted(defaults))}")
    out = {**defaults, **options}

    def bad(key: str, need: str) -> ValueError:
        return ValueError(f"model.options.{key}: {need} for model '{model}', got {out[key]!r}")

    if "norm" in out and out["norm"] not in norms:
        raise bad("norm", f"must be one of {', '.join(norms)}")
    if "track_running_stats" in out and not isinstance(out["track_running_stats"], bool):
        raise bad("track_running_stats", "must be true or false")
    if "scaler_rate" in out:
        r = out["scaler_rate"]
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (r > 0 and math.isfinite(r)):
            raise bad("scaler_rate", "must be a finite number > 0")
        out["scaler_rate"] = float(r)
    if "dropout" in out:
        p = out["dropout"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise bad("dropout", "must be a number in [0, 1)")
        out["dropout"] = float(p)
    return out


def int_shape(input_shape: Iterable[Any]) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of Python ints if every entry is a positive integer (NumPy and
    0-d integer tensors included, as ``tuple(array.shape)`` or ``tuple(np.array(...))`` give), else None."""
    out = []
    for s in input_shape:
        if isinstance(s, torch.Tensor) and s.dim() == 0 and not s.is_floating_point() and s.dtype != torch.bool:
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            return None
        out.append(int(s))
    return tuple(out)


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Validate a (C, H, W) sample shape; returns it as Python ints."""
    shape = tuple(input_shape)
    ints = int_shape(shape)
    if len(shape) != 3 or ints is None:
        raise ValueError(f"model '{model}' expects input_shape (C, H, W) with positive integers, "
                         f"got {shape}")
    return ints  # type: ignore[return-value]


def conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class InputTooSmallError(ValueError):
    """A model cannot take samples this small; ``need`` says what it needs (e.g. 'at least 32x32 (...)')."""

    def __init__(self, model: str, input_shape: tuple[int, ...], need: str):
        super().__init__(f"model '{model}': input_shape {tuple(input_shape)} is too small; it needs {need}")
        self.model, self.input_shape, self.need = model, tuple(input_shape), need

    def __reduce__(self) -> tuple[Any, ...]:  # a worker process's error must unpickle in the parent
        return type(self), (self.model, self.input_shape, self.need)


def require_spatial(model: str, input_shape: tuple[int, int, int], out_size: Callable[[int], int],
                    why: str) -> None:
    """Raise :class:`InputTooSmallError` naming the smallest usable input if ``out_size`` of H or W is below 1.

    ``out_size`` maps one spatial side to the side left after the network's last down-sampling; it
    must be monotone (it is for every stack of convolutions and poolings).
    """
    _, h, w = input_shape
    if out_size(h) >= 1 and out_size(w) >= 1:
        return
    smallest = next((n for n in range(1, 4097) if out_size(n) >= 1), None)
    need = f"at least {smallest}x{smallest}" if smallest else "a larger input"
    raise InputTooSmallError(model, input_shape, f"{need} ({why})")
