"""fedslim.engine.rewrite: pooling moved before the activation gives the same numbers, bit for bit;
narrow channels padded with zeros give the same numbers up to float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedslim.config import OptimizerConfig
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.backends import ModelBuffers, SerialBackend
from fedslim.engine.client import train_model
from fedslim.engine.rewrite import ChannelPaddedConv2d, pad_narrow_channels, pool_before_activation
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


def _lenet_client(spec: ModelSpec) -> tuple[ClientStore, ClientTask, nn.Module]:
    """A LeNet-5 client on 96 samples with a constant border (ties), its train task, and the model as built
    (channels-last, the engine's CPU default) whose weights the task starts from."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    x[:, :, :5] = -0.4242
    bundle = DatasetBundle("synthetic", TensorData(x, y), TensorData(x[:8], y[:8]), 10, (1, 28, 28))
    store = ClientStore(bundle, [torch.arange(96)], channels_last=True)
    torch.manual_seed(0)
    original = spec.build().to(memory_format=torch.channels_last)
    state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    train = LocalTrain(2, 32, OptimizerConfig(name="adam", lr=1e-3), 1e-3)
    return store, ClientTask(client=0, round=0, spec=spec, state=state, train=train, seed=3), original


def test_serial_client_trains_the_rewritten_model_with_identical_updates():
    # The engine's model buffer is rewritten; its update must equal one computed on the model as built.
    # The channel padding is off here: it is exact only up to rounding (tested below).
    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    buf = ModelBuffers("cpu", channels_last=True).get(spec)
    assert isinstance(buf.features[3], nn.MaxPool2d) and isinstance(buf.features[4], nn.ReLU)

    store, task, original = _lenet_client(spec)
    state = task.state
    got = SerialBackend(store, pad_channels=False).run([task])[0]

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


def _padded_pairs(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.pad_out, m.pad_in) for n, m in model.named_modules() if isinstance(m, ChannelPaddedConv2d)}


def _outputs_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out.detach(), *(p.grad for p in model.parameters())]


@pytest.mark.parametrize(("width", "pad"), [(1.0, 2), (0.5, 5)])
def test_narrow_lenet_channels_padded_give_the_same_numbers(width, pad):
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=(1, 28, 28), width=width)
    model = model.to(memory_format=torch.channels_last)
    padded = copy.deepcopy(model)
    pool_before_activation(padded)
    assert pad_narrow_channels(padded) == ["features.0"]
    assert _padded_pairs(padded) == {"features.0": (pad, 0), "features.5": (0, pad)}
    # Parameters keep their names and shapes: state dicts and optimizer state are those of the model.
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last)
    x[:, :, :6] = -0.4242
    # The padded channels reach the second convolution and are zero there.
    seen: list[torch.Tensor] = []
    padded.features[5].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    for a, b in zip(_outputs_and_grads(model, x), _outputs_and_grads(padded, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    c = model.features[0].out_channels
    assert seen[0].shape[1] == c + pad and not seen[0][:, c:].any()


def test_padding_stops_at_layers_that_would_see_or_change_the_padded_channels():
    def chain(*between: nn.Module, first: int = 6, second_in: int = 6, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, first, 3), *between, nn.Conv2d(second_in, 8, 3, groups=groups))

    ok = chain(nn.ReLU(), nn.MaxPool2d(2), nn.Identity(), nn.ReLU6())
    assert pad_narrow_channels(ok) == ["0"] and _padded_pairs(ok) == {"0": (2, 0), "5": (0, 2)}
    for seq in (chain(nn.BatchNorm2d(6)), chain(nn.Dropout(0.1)), chain(nn.LeakyReLU(0.1)),
                chain(nn.MaxPool2d(2, return_indices=True)), chain(first=8, second_in=8),
                chain(first=6, second_in=6, groups=2), chain(nn.AvgPool2d(2))):
        assert pad_narrow_channels(seq) == [], seq
        assert all(type(m) is not ChannelPaddedConv2d for m in seq)
    # A padded layer still trains its own parameters: the padding is made in the forward.
    torch.manual_seed(0)
    ref = chain(nn.ReLU())
    new = copy.deepcopy(ref)
    pad_narrow_channels(new, channels_last=False)
    x = torch.randn(2, 3, 9, 9)
    for a, b in zip(_outputs_and_grads(ref, x), _outputs_and_grads(new, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_only_channels_last_cpu_buffers_outside_the_vectorized_backend_are_padded():
    from fedslim.engine.vectorized import VectorizedBackend

    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    assert _padded_pairs(ModelBuffers("cpu", channels_last=True).get(spec)) == {"features.0": (2, 0),
                                                                                "features.5": (0, 2)}
    assert _padded_pairs(ModelBuffers("cpu", channels_last=False).get(spec)) == {}
    assert _padded_pairs(ModelBuffers("cpu", channels_last=True, rewrite=False).get(spec)) == {}
    assert _padded_pairs(ModelBuffers("cpu", channels_last=True, pad_channels=False).get(spec)) == {}
    assert ModelBuffers("cuda", channels_last=True).pad_channels is False
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    store = ClientStore(DatasetBundle("synthetic", TensorData(x, y), TensorData(x, y), 10, (1, 28, 28)),
                        [torch.arange(8)], channels_last=True)
    assert _padded_pairs(SerialBackend(store).buffers.get(spec)) != {}
    assert _padded_pairs(VectorizedBackend(store).buffers.get(spec)) == {}


def test_serial_update_with_padded_channels_matches_the_unpadded_one():
    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    store, task, _ = _lenet_client(spec)
    padded, plain = (SerialBackend(store, pad_channels=on).run([task])[0] for on in (True, False))
    assert set(padded.delta) == set(plain.delta)
    for k in plain.delta:
        torch.testing.assert_close(padded.delta[k], plain.delta[k], rtol=1e-4, atol=1e-6)
    assert any(padded.delta[k].abs().max() > 1e-4 for k in plain.delta)  # it did train


def test_strided_pointwise_convs_are_subsampled_with_the_same_values() -> None:
    from fedslim.engine.rewrite import SubsampledConv2d, avoid_narrow_strided_pointwise

    torch.manual_seed(0)
    convs = nn.ModuleDict({"narrow": nn.Conv2d(4, 8, 1, stride=2, bias=True), "wide": nn.Conv2d(8, 16, 1, stride=2),
                           "unstrided": nn.Conv2d(4, 8, 1), "spatial": nn.Conv2d(4, 8, 3, stride=2, padding=1)})
    ref = copy.deepcopy(convs)
    assert avoid_narrow_strided_pointwise(convs) == ["narrow"]
    assert type(convs["narrow"]) is SubsampledConv2d and all(type(convs[k]) is nn.Conv2d for k in
                                                             ("wide", "unstrided", "spatial"))
    assert list(convs.state_dict()) == list(ref.state_dict())
    for hw in (27, 28):  # odd sizes: the last row and column are still taken
        x = torch.randn(5, 4, hw, hw, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = convs["narrow"](x), ref["narrow"](x_ref)  # contiguous: torch's strided kernel is safe here
        # The same products and sums; a different kernel may round their order differently.
        assert y.shape == y_ref.shape and torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        assert x.grad[:, :, 1::2].abs().sum() == 0  # rows the stride skips get no gradient
    assert torch.allclose(convs["narrow"].weight.grad, ref["narrow"].weight.grad, rtol=1e-4, atol=1e-4)


def test_channels_last_cpu_buffers_train_a_narrow_resnet_with_shortcut_convs() -> None:
    """torch 2.13's channels-last kernel for these shortcuts corrupted the heap within a few steps."""
    from fedslim.engine.rewrite import SubsampledConv2d

    spec = ModelSpec.make("preresnet18", 10, (1, 28, 28), width=0.0625)
    m = ModelBuffers("cpu", channels_last=True, rewrite=False).get(spec)
    assert any(type(c) is SubsampledConv2d for c in m.modules())
    assert not any(type(c) is SubsampledConv2d for c in ModelBuffers("cpu", channels_last=False).get(spec).modules())
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last),
                      torch.randint(0, 10, (96,), generator=g))
    task = ClientTask(0, 1, spec, {}, LocalTrain(1, 32, OptimizerConfig(name="sgd", lr=0.05), 0.05), seed=3)
    steps, loss, _ = train_model(m, task, data)
    assert steps == 3 and loss == loss  # finite: not NaN
