"""fedslim.engine.flat: one flat tensor behind a model buffer's parameters, and another behind their
gradients; the padded convolutions' weights stored padded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedslim.engine.client as client
import fedslim.engine.rewrite as rewrite
from fedslim.config import OptimizerConfig
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.backends import ModelBuffers, SerialBackend
from fedslim.engine.client import train_model
from fedslim.engine.flat import FLAT_ATTR, FlatParameters, FlatStep, flat_parameters
from fedslim.engine.rewrite import ChannelPaddedConv2d
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec

SPEC = ModelSpec.make("lenet5", 10, (1, 28, 28))


def _client(optimizer: str = "adam", seed: int = 3) -> tuple[ClientStore, ClientTask]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    x[:, :, :5] = 0.0  # zero borders, as in MNIST
    bundle = DatasetBundle("synthetic", TensorData(x, y), TensorData(x[:8], y[:8]), 10, (1, 28, 28))
    store = ClientStore(bundle, [torch.arange(96)], channels_last=True)
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in SPEC.build().state_dict().items()}
    opt = OptimizerConfig(name=optimizer, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    return store, ClientTask(client=0, round=0, spec=SPEC, state=state, train=LocalTrain(2, 32, opt, 1e-2), seed=seed)


def _buffer() -> nn.Module:
    torch.manual_seed(0)
    return ModelBuffers("cpu", channels_last=True).get(SPEC)


def _padded(model: nn.Module) -> list[ChannelPaddedConv2d]:
    return [m for m in model.modules() if isinstance(m, ChannelPaddedConv2d) and (m.pad_in or m.pad_out)]


def test_flattening_keeps_names_shapes_layouts_values_and_outputs():
    model = _buffer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layouts = {k: v.is_contiguous(memory_format=torch.channels_last) for k, v in model.named_parameters()}
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = model(x)
    flat = flat_parameters(model)
    assert flat is not None
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    for k, p in model.named_parameters():
        assert p.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr(), k
        if p.dim() == 4 and layouts[k]:
            # a real weight inside a padded one is a strided view; its channel axis still has stride 1
            assert p.stride()[1] == 1, k
    # Two weights stored padded: LeNet-5's 6 channels in vectors of 8, zero in the extra ones.
    first, second = _padded(model)
    assert first.full_weight is not None and first.full_weight.shape[0] == 8 and second.full_weight is not None
    assert second.full_weight.shape[1] == 8
    assert torch.count_nonzero(first.full_weight[6:]) == 0 and torch.count_nonzero(second.full_weight[:, 6:]) == 0
    assert torch.equal(model(x), y)


def test_padded_forward_uses_the_stored_padding(monkeypatch):
    calls = []
    real_pad = rewrite.F.pad
    monkeypatch.setattr(rewrite.F, "pad", lambda *a, **k: calls.append(1) or real_pad(*a, **k))
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model = _buffer()
    model(x)
    padded_per_forward = len(calls)
    assert padded_per_forward == 3  # the first weight and bias, the second weight
    flat_parameters(model)
    model(x)
    assert len(calls) == padded_per_forward  # none added


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_flat_update_matches_per_tensor_and_keeps_the_padding_zero(monkeypatch, optimizer):
    store, task = _client(optimizer)
    flat = SerialBackend(store).run([task])[0]
    with monkeypatch.context() as m:
        m.setattr(client, "flat_parameters", lambda model: None)
        per_tensor = SerialBackend(store).run([task])[0]
    assert set(flat.delta) == set(per_tensor.delta)
    for k in per_tensor.delta:
        torch.testing.assert_close(flat.delta[k], per_tensor.delta[k], rtol=1e-4, atol=1e-5)
    assert max(float(d.abs().max()) for d in flat.delta.values()) > 1e-3  # it did train
    # Trained in the buffer of a fresh backend: the padded channels are still exactly zero.
    backend = SerialBackend(store)
    backend.run([task])
    model = backend.buffers.get(SPEC)
    first, second = _padded(model)
    assert first.full_weight is not None and first.full_bias is not None and second.full_weight is not None
    assert torch.count_nonzero(first.full_weight[6:]) == 0 and torch.count_nonzero(first.full_bias[6:]) == 0
    assert torch.count_nonzero(second.full_weight[:, 6:]) == 0
    assert torch.count_nonzero(first.full_weight[:6]) > 0


def test_gradients_set_to_none_elsewhere_are_reattached():
    store, task = _client()
    backend = SerialBackend(store)
    first = backend.run([task])[0]
    backend.buffers.get(SPEC).zero_grad(set_to_none=True)  # as a procedure of some algorithm might
    again = backend.run([task])[0]
    for k, v in first.delta.items():
        assert torch.equal(again.delta[k], v), k


def test_a_deep_copy_is_flattened_again_and_trains_apart_from_the_original():
    store, task = _client()
    model = _buffer()
    train_model(model, task, store.get(0, "train"))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    old = getattr(twin, FLAT_ATTR)
    train_model(twin, task, store.get(0, "train"))
    new = flat_parameters(twin)
    assert isinstance(new, FlatParameters) and new is not old
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k  # the original did not move
    assert any(not torch.equal(v, original[k]) for k, v in twin.state_dict().items())


def test_a_frozen_parameter_keeps_the_per_tensor_step():
    store, task = _client()
    model = _buffer()
    model.classifier.weight.requires_grad_(False)
    frozen, trained = model.classifier.weight.clone(), model.fc[0].weight.clone()
    assert flat_parameters(model) is None
    train_model(model, task, store.get(0, "train"))
    assert torch.equal(model.classifier.weight, frozen)
    assert not torch.equal(model.fc[0].weight, trained)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "momentum", "nesterov", "weight_decay"), [
    ("adam", 0.0, False, 0.0), ("adam", 0.0, False, 1e-2), ("sgd", 0.0, False, 0.0), ("sgd", 0.9, False, 1e-2),
    ("sgd", 0.9, True, 0.0)])
def test_the_direct_step_is_torch_optims_fused_step_bit_for_bit(name, momentum, nesterov, weight_decay, device):
    opt = OptimizerConfig(name=name, lr=1e-2, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                          betas=(0.8, 0.99))
    train = LocalTrain(1, 8, opt, 3e-3)  # the scheduled lr (3e-3), not the configured one, applies
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(1003, generator=gen).to(device)
    grads = [torch.randn(1003, generator=gen).to(device) for _ in range(5)]
    mine, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    step, ref = FlatStep(mine, train), client.build_optimizer([theirs], train)
    for g in grads:
        mine.grad, theirs.grad = g.clone(), g.clone()
        step.step()
        ref.step()
        assert torch.equal(mine.data, theirs.data)
    assert not torch.equal(mine.data, start)


def test_a_flattened_model_still_trains_under_a_plain_optimizer():
    # Another optimizer over model.parameters() that sets gradients to None: the padded convolutions
    # must then send their gradients to the real weights it steps (the forward pads them again).
    model = _buffer()
    flat_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _padded(model)[0]
    before = first.weight.detach().clone()
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), torch.arange(8)).backward()
        assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(first.weight, before)


def test_a_parameter_frozen_after_flattening_stays_frozen():
    store, task = _client()
    model = _buffer()
    train_model(model, task, store.get(0, "train"))  # flattened now
    model.classifier.weight.requires_grad_(False)
    frozen, trained = model.classifier.weight.detach().clone(), _padded(model)[0].weight.detach().clone()
    assert flat_parameters(model) is None
    train_model(model, task, store.get(0, "train"))
    assert torch.equal(model.classifier.weight, frozen)
    assert not torch.equal(_padded(model)[0].weight, trained)
