"""Model size and compute: parameter counts, MACs per sample, float32 bytes.

MACs are measured with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the
matrix-multiply and convolution FLOPs (2 per multiply-accumulate) of one forward pass; norms,
activations and pooling are not counted, as is usual for MAC figures.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Two samples, not one: a BatchNorm1d without running statistics (static BN) cannot normalise a
# batch of one, even in eval mode.
_PROFILE_BATCH = 2


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def forward_zeros(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """One forward pass of zero samples of ``input_shape`` in eval mode, without gradients, for what
    hooks or counters see; running statistics and random generators are left alone and the model's
    train/eval mode is restored. Returns the number of samples (divide per-batch counts by it)."""
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros((_PROFILE_BATCH, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return _PROFILE_BATCH


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on ONE sample of ``input_shape``, in eval mode.

    The model's train/eval mode is restored afterwards and no gradients are recorded.
    """
    with FlopCounterMode(display=False) as counter:
        n = forward_zeros(model, input_shape)
    return counter.get_total_flops() // (2 * n)


def _float_state_numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def freeze_option(value: Any) -> Any:
    """A model option as a hashable value, for keys and specs: lists (as YAML gives them) become
    tuples, nested ones too; the models take either."""
    if isinstance(value, list | tuple):
        return tuple(freeze_option(v) for v in value)
    return value


@functools.lru_cache(maxsize=512)
def _profile(name: str, num_classes: int, input_shape: tuple[int, ...], width: float,
             options: tuple[tuple[str, Any], ...]) -> tuple[int, int, int]:
    from fedslim.models import build_model

    # Meta tensors: no memory, no time spent initialising weights, and the global RNG is untouched
    # (profiling must not change what a seeded run builds next). Shapes, and hence counts, are exact.
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, input_shape=input_shape, width=width,
                            **dict(options))
    return count_params(model), count_macs(model, input_shape), 4 * _float_state_numel(model)


def profile_spec(name: str, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                 **options: Any) -> dict[str, int]:
    """Size and compute of a model spec, cached per (name, classes, shape, width, options).

    Returns ``params`` (parameter elements), ``macs`` (per sample, eval mode) and ``bytes_float32``:
    4 bytes for every floating-point element of the state dict (parameters and BN running
    statistics), i.e. the size of the model as dense float32 tensors.
    """
    from fedslim.models.layers import check_common_args

    # Checked before the conversions below, which would turn width True into 1.0 and "0.5" into 0.5.
    check_common_args(name, num_classes, width)
    key = tuple(sorted((k, freeze_option(v)) for k, v in options.items()))
    args = (name, int(num_classes), tuple(input_shape), float(width))
    try:
        hash(key)
    except TypeError:
        # An option value the cache cannot key (a mapping): build uncached, so the model's own
        # check names the option instead of the cache failing with "unhashable type".
        params, macs, nbytes = _profile.__wrapped__(*args, tuple(options.items()))
    else:
        params, macs, nbytes = _profile(*args, key)
    return {"params": params, "macs": macs, "bytes_float32": nbytes}
