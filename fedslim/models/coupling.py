"""Channel coupling: which tensor dimensions of a model index the same channels.

Width-scaled sub-models (HeteroFL, FedRolex, Federated Dropout, DAC) keep a subset of every hidden
layer's channels. A channel kept in one tensor must be kept, at the same positions, in every other
tensor that indexes it: a convolution's output channels are its bias's entries, its norm's
parameters and statistics, and the next layer's input channels; a residual add ties the channels
of both branches; a depthwise convolution ties its input to its output. Prefix slicing (HeteroFL)
gets this right without knowing any of it, but any other choice of channels does not, so every
model family declares its couplings with a ``channel_groups()`` method returning a list of groups,
each a list of ``(state-dict key, axis, block)`` members. ``block`` is the number of consecutive
entries per channel along that axis: 1 almost everywhere, ``H*W`` for a linear layer that reads a
channel-major flattened ``C x H x W`` feature map.

Axes that never scale (input image channels, classifier outputs, kernel sides) are in no group.
"""

from __future__ import annotations

from torch import nn

Member = tuple[str, int, int]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


class CouplingBuilder:
    """Union-find over channel groups, filled in while walking a model in forward order."""

    def __init__(self, model: nn.Module):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self._members: list[list[Member]] = []
        self._parent: list[int] = []

    def new(self) -> int:
        self._parent.append(len(self._parent))
        self._members.append([])
        return len(self._parent) - 1

    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def tie(self, a: int, b: int) -> int:
        """Merge two groups (a residual add, a shortcut); returns the surviving id."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            self._members[ra] += self._members[rb]
            self._members[rb] = []
        return ra

    def add(self, g: int, key: str, axis: int, block: int = 1) -> None:
        if key in self.shapes:  # absent buffers (static BN) and biases are simply skipped
            self._members[self.find(g)].append((key, axis, block))

    def size(self, g: int) -> int:
        key, axis, block = self._members[self.find(g)][0]
        return self.shapes[key][axis] // block

    def layer(self, name: str, module: nn.Module, g_in: int | None) -> int:
        """A convolution or linear layer reading group ``g_in`` (None: the model input); returns the
        group of its outputs. A depthwise convolution's outputs are its inputs' group."""
        w = f"{name}.weight"
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups > 1:
            if not (module.groups == module.in_channels == module.out_channels) or g_in is None:
                raise ValueError(f"{name}: only depthwise grouped convolutions can be coupled")
            self.add(g_in, w, 0)
            self.add(g_in, f"{name}.bias", 0)
            return g_in
        if g_in is not None:
            self._read(name, module, g_in)
        g = self.new()
        self.add(g, w, 0)
        self.add(g, f"{name}.bias", 0)
        return g

    def head(self, name: str, module: nn.Module, g_in: int) -> None:
        """The output layer: its inputs scale, its outputs (the classes) never do."""
        self._read(name, module, g_in)

    def norm(self, name: str, module: nn.Module, g: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            self.add(g, f"{name}.{suffix}", 0)

    def _read(self, name: str, module: nn.Module, g_in: int) -> None:
        w = f"{name}.weight"
        fan_in, channels = self.shapes[w][1], self.size(g_in)
        if fan_in % channels:
            raise ValueError(f"{w}: {fan_in} inputs are not a whole number per channel of {channels}")
        self.add(g_in, w, 1, fan_in // channels)

    def groups(self) -> list[list[Member]]:
        return [list(m) for i, m in enumerate(self._members) if self._parent[i] == i and m]


def chain_groups(model: nn.Module) -> list[list[Member]]:
    """Couplings of a plain chain (no branches): every weighted layer reads the previous one's
    outputs, norms act on the current channels, the last weighted layer is the classifier.

    Relies on ``named_modules()`` listing layers in forward order, which holds for every chain
    family in the zoo (their submodules are defined in the order they run).
    """
    b = CouplingBuilder(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (*_WEIGHTED, *_NORMS))]
    last = max(i for i, (_, m) in enumerate(layers) if isinstance(m, _WEIGHTED))
    g: int | None = None
    for i, (name, m) in enumerate(layers):
        if isinstance(m, _WEIGHTED):
            if i == last:
                assert g is not None
                b.head(name, m, g)
            else:
                g = b.layer(name, m, g)
        elif g is not None:
            b.norm(name, m, g)
    return b.groups()
