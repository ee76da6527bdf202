"""fedslim.engine.rewrite: pooling moved before the activation gives the same numbers, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedslim.config import OptimizerConfig
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.backends import ModelBuffers, SerialBackend
from fedslim.engine.client import train_model
from fedslim.engine.rewrite import pool_before_activation
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec
from fedslim.models import build_model


def _grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    torch.manual_seed(5)  # the same dropout masks for both models
    out = model(x * 1)  # not the leaf itself: an in-place ReLU may then run on it
    out.backward(g)
    assert x.grad is not None
    return out.detach(), [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(5)
    ya = a(x * 1)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1))
    (oa, ga), (ob, gb) = _grads(a, x, g), _grads(b, x, g)
    assert torch.equal(oa, ob)
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, lambda: nn.ReLU(inplace=True)])
def test_pair_with_ties_matches_bit_for_bit(act):
    # Values from a small set: most 2x2 windows hold ties, at zero, at 6 and among positive values.
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 9, (4, 3, 8, 8), generator=gen).float()
    ref = nn.Sequential(nn.Identity(), act(), nn.MaxPool2d(2), nn.Flatten())
    swapped = copy.deepcopy(ref)
    assert pool_before_activation(swapped) == ["2"]
    assert isinstance(swapped[1], nn.MaxPool2d) and type(swapped[2]) is type(ref[1])
    _assert_same(ref, swapped, x)


@pytest.mark.parametrize("name", ["lenet5", "twocnn", "heterofl_cnn", "alexnet", "vgg16", "convbn9"])
def test_zoo_models_match_bit_for_bit(name):
    # Every zoo model with an activation-then-max-pool pair (the others have none to move).
    torch.manual_seed(0)
    kw = {"width": 0.25} if name in ("heterofl_cnn", "alexnet", "vgg16", "convbn9") else {}
    shape = (3, 32, 32) if name in ("vgg16", "convbn9") else (1, 28, 28)
    model = build_model(name, num_classes=10, input_shape=shape, **kw)
    swapped = copy.deepcopy(model)
    moved = pool_before_activation(swapped)
    assert len(moved) >= 2
    assert list(swapped.state_dict()) == list(model.state_dict())
    # A constant border (MNIST's normalized background) makes the convolutions' outputs tie there.
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2))
    x[:, :, :6] = -0.4242
    _assert_same(model, swapped, x)


def test_leaky_relu_and_indexed_pools_stay():
    seq = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2, return_indices=True),
                        nn.ReLU(), nn.AvgPool2d(2))
    before = [type(m) for m in seq]
    assert pool_before_activation(seq) == []
    assert [type(m) for m in seq] == before


def test_nested_sequentials_are_named_and_pairs_do_not_overlap():
    inner = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(1))
    model = nn.Sequential(nn.Sequential(inner), nn.ReLU(), nn.MaxPool1d(2))
    assert pool_before_activation(model) == ["2", "0.0.2"]
    assert [type(m) for m in inner] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.MaxPool2d]


def test_serial_client_trains_the_rewritten_model_with_identical_updates():
    # The engine's model buffer is rewritten; its update must equal one computed on the model as built
    # (float32, channels-last: the engine's CPU defaults).
    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    buf = ModelBuffers("cpu", channels_last=True).get(spec)
    assert isinstance(buf.features[3], nn.MaxPool2d) and isinstance(buf.features[4], nn.ReLU)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    x[:, :, :5] = -0.4242
    bundle = DatasetBundle("synthetic", TensorData(x, y), TensorData(x[:8], y[:8]), 10, (1, 28, 28))
    store = ClientStore(bundle, [torch.arange(96)], channels_last=True)
    torch.manual_seed(0)
    original = spec.build().to(memory_format=torch.channels_last)
    state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    train = LocalTrain(2, 32, OptimizerConfig(name="adam", lr=1e-3), 1e-3)
    task = ClientTask(client=0, round=0, spec=spec, state=state, train=train, seed=3)
    got = SerialBackend(store).run([task])[0]

    torch.manual_seed(0)
    train_model(original, task, store.get(0, "train"))
    for k, v in original.state_dict().items():
        assert torch.equal(got.delta[k], (v - state[k]).contiguous()), k


def test_every_backend_model_comes_rewritten_unless_switched_off():
    from fedslim.engine.vectorized import VectorizedBackend

    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    store = ClientStore(DatasetBundle("synthetic", TensorData(x, y), TensorData(x, y), 10, (1, 28, 28)),
                        [torch.arange(8)])
    for on in (True, False):
        for backend in (SerialBackend(store, rewrite=on), VectorizedBackend(store, rewrite=on)):
            kinds = [type(m) for m in backend.buffers.get(spec).features]
            assert kinds[3:5] == ([nn.MaxPool2d, nn.ReLU] if on else [nn.ReLU, nn.MaxPool2d])
