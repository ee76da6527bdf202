"""How client training uses the host: the allocator's settings, one-time costs, and the memory layout
of image models.

These are engine choices: they change speed, not what is computed (the layout changes which kernels
run, so float32 results may differ in their last bits, as with the thread count).

Allocator. A LeNet step on MNIST frees and allocates several megabyte-sized buffers. With glibc's
defaults the top of the heap is given back to the kernel when a step frees them and faulted in again
(zero-filled) by the next: bench/step_cost.py counted 744 page faults per one-core LeNet step.
Fixing the mmap threshold at glibc's own ceiling for it (32 MiB) and raising the trim threshold keeps
that memory in the process (0 faults per step there). The price is up to 128 MiB of freed heap kept
per process. Forked workers inherit the settings; Ray actors set them themselves.

Warm-up. torch's first optimizer imports ``torch._dynamo`` (~2 s on these CPUs). A process that is
going to train does it once when it starts (the driver before it forks its workers, each Ray actor),
not inside its first client update.

Layout. On the CPU, oneDNN's convolutions and max-pooling run faster on channels-last (NHWC) tensors
than on NCHW; a LeNet step on one core is ~1.3x faster (bench/step_cost.py). On CUDA in float32 the
gain is not general, so ``auto`` keeps NCHW there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@functools.cache
def tune_malloc() -> bool:
    """Apply the allocator settings above to this process (once). False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both are needed: setting the trim threshold alone also freezes the mmap threshold at its
    # 128 KiB start, so every buffer above it becomes an mmap/munmap pair (worse than the defaults).
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping libc's defaults")
    return ok


@functools.cache
def warm_up_optimizers() -> None:
    """Pay torch's one-time optimizer import now (see the module docstring)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def use_channels_last(setting: str, device: str, input_shape: tuple[int, ...]) -> bool:
    """Whether client models and image batches are kept channels-last (``engine.memory_format``)."""
    if setting not in MEMORY_FORMATS:
        raise ValueError(f"engine.memory_format: unknown value {setting!r}; allowed: {', '.join(MEMORY_FORMATS)}")
    if len(input_shape) != 3:  # not (C, H, W) images: nothing to lay out
        return False
    if setting == "auto":
        return not str(device).startswith("cuda")
    return setting == "channels_last"


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
