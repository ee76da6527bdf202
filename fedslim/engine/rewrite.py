"""Exact rewrites of a client's training model: the same numbers, computed on smaller tensors.

Pool before activation. In ``Sequential(..., ReLU(), MaxPool2d(2), ...)`` the activation runs on the
full feature map and the pooling throws three quarters of it away. ``max`` commutes with a
non-decreasing function, so ``MaxPool(ReLU(x)) == ReLU(MaxPool(x))`` value for value, and swapping
the two runs the activation (and its backward) on the pooled map only. The gradients are the same
too, not merely close. Where the window's maximum is positive, both orders send the gradient to the
window's first maximal element. Where it is not, ReLU's derivative is zero in both orders, so it
does not matter which element the pooling picked (ReLU-first picks the first of the zeros, a tie;
pool-first picks the first maximum of x). The tests check forward values and gradients bit for bit,
including windows of ties.

Every client model the engine trains comes from ``ModelBuffers`` and is rewritten there (serial,
process, Ray, and the vectorized backend, whose stacked model is built from that buffer). It matters
most to the stacked model, whose feature maps hold every client's channels and no longer fit in the
cache: ``bench/vectorized_step.py --clients 12 --steps 19 --threads 1 --rewrite-ab`` gave a stacked
LeNet-5 cohort step of 70.97 ms against 89.35 ms without the rewrite (1.26x; 1.09x in an earlier
run of the same comparison), and a serial one of 81.46 against 84.16 ms (1.03x).

Only the activations for which the argument holds exactly in floating point are moved: ``ReLU`` and
``ReLU6`` (clamps: no rounding, and no new ties outside the regions where the derivative is zero).
``LeakyReLU`` is left alone: rounding ``slope * x`` can make two different negative inputs equal, and
the tie then sends the gradient to a different element. Poolings that return indices are left alone
(their output is a tuple), and so are layers not held in an ``nn.Sequential``, whose order is the
model's own ``forward``.

The modules keep their names, so ``state_dict`` keys, which belong to the convolutions and norms around
them, do not change.
"""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def pool_before_activation(model: nn.Module) -> list[str]:
    """Swap every ``activation, max-pool`` pair held in an ``nn.Sequential`` of ``model`` (in place).
    Returns the qualified names of the pools moved."""
    moved: list[str] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            a, p = seq._modules[names[i]], seq._modules[names[i + 1]]
            if type(a) in _ACTIVATIONS and type(p) in _POOLS and not p.return_indices:
                seq._modules[names[i]], seq._modules[names[i + 1]] = p, a
                moved.append(f"{prefix}.{names[i + 1]}" if prefix else names[i + 1])
                i += 2
            else:
                i += 1
    return moved
