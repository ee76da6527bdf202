"""How much memory a device has free, and how much one client of a batched group needs there.

The vectorized backend holds G clients' copies of everything at once. On a GPU a group that does not
fit raises ``torch.OutOfMemoryError`` and is retried in halves; on a CPU the kernel's OOM killer ends
the whole run with no message instead. So the backend sizes its groups before it starts them, from
an estimate made here that errs on the large side.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedslim.models.profile import forward_zeros

# Copies of a client's model state alive at the peak of a batched step: the start and current
# weights, the gradients, Adam's two moments and the denominator it builds, a weight-decayed gradient,
# the deltas taken at the end. (SGD needs fewer; the estimate is meant to be an upper bound.)
STATE_COPIES = 7
# Per sample and activation element: the output autograd keeps, its gradient, and a layout copy
# (channels-last, the stacked layout) of either.
ACTIVATION_COPIES = 3

_CGROUP_FILES = [  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
]


def _cgroup_headroom() -> int | None:
    """Bytes left under this container's memory limit, if it sets one (psutil reports the host's)."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # "no limit", as v2 and v1 write it
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation on ``device`` can take without evicting anything; None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        # Memory torch's caching allocator holds but does not use is free for torch's next tensors.
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type == "cpu":
        import psutil

        avail = int(psutil.virtual_memory().available)
        headroom = _cgroup_headroom()
        return avail if headroom is None else min(avail, headroom)
    return None


def activation_elements_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements of every leaf module's output for one input sample (see ``forward_zeros``)."""
    total = 0

    def count(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        n = forward_zeros(model, input_shape)
    finally:
        for h in handles:
            h.remove()
    return total // n


def client_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """An upper estimate of what one more client in a batched training step costs in memory."""
    p = next(model.parameters())
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    acts = activation_elements_per_sample(model, input_shape) * batch_size * p.element_size()
    return STATE_COPIES * state + ACTIVATION_COPIES * acts
