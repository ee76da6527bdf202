"""Stacked models (fedslim.engine.stacked): k clients' copies of a model as one module."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_backend_vectorized import SHAPE, adam, assert_close, make_store, make_tasks
from torch import nn

from fedslim.engine.backends import SerialBackend
from fedslim.engine.stacked import ClientRng, check_stacked, forward_stacked, stack_input, stack_model
from fedslim.engine.store import ClientStore
from fedslim.engine.task import LocalTrain, ModelSpec
from fedslim.engine.vectorized import VectorizedBackend
from fedslim.models import build_model
from fedslim.registry import MODELS

ZOO_SHAPE = (3, 32, 32)  # VGG-16 needs 32x32


def _zoo_model(name: str, norm: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10, input_shape=ZOO_SHAPE, width=0.125, norm=norm, dropout=dropout)


@pytest.mark.parametrize("norm,dropout", [("bn", 0.0), ("gn", 0.0), ("none", 0.0), ("bn", 0.5)])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_zoo_model_stacks(name: str, norm: str, dropout: float) -> None:
    """With dropout the check compares masks too: per-client seeds against the global generator."""
    model = _zoo_model(name, norm, dropout)
    made = stack_model(model)
    assert not isinstance(made, str), made
    assert check_stacked(model, *made, ZOO_SHAPE, 10) is None


def test_check_catches_dropout_masks_drawn_from_the_wrong_state(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _zoo_model("lenet5", "none", 0.5)
    made = stack_model(model)
    assert not isinstance(made, str)
    inner = ClientRng.dropout_mask

    def client0(self: ClientRng, client: int, *a: object) -> torch.Tensor:
        return inner(self, 0, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(ClientRng, "dropout_mask", client0)
    why = check_stacked(model, *made, ZOO_SHAPE, 10)
    assert why is not None and "differs" in why


@pytest.mark.parametrize("layer", [nn.Dropout2d(0.3), nn.AlphaDropout(0.3)])
def test_dropout_kinds_without_a_replay_are_refused_by_name(layer: nn.Module) -> None:
    why = stack_model(nn.Sequential(nn.Conv2d(1, 2, 3), layer))
    assert isinstance(why, str) and "layer 1" in why and type(layer).__name__ in why
    assert not isinstance(stack_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.0))), str)


def test_client_rng_leaves_the_global_generator_as_it_was() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    rng = ClientRng("cpu", [5, 6])
    a = rng.dropout_mask(0, (4, 8), 0.5, torch.zeros(1), torch.contiguous_format)
    rng.close()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    assert torch.equal(a, torch.nn.functional.dropout(torch.ones(4, 8), 0.5, True))  # serial's draw


def test_stacked_input_layout_is_client_major_and_channels_last_when_asked() -> None:
    x = torch.randn(3, 4, 2, 5, 5)  # k clients, B samples, C channels
    for cl in (False, True):
        s = stack_input(x, cl)
        assert s.shape == (4, 6, 5, 5)
        assert torch.equal(s[:, 2:4], x[1])  # client 1's channels come second
        assert s.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_batchnorm_statistics_leave_out_weight_zero_samples() -> None:
    """A client's padded samples change neither its outputs on real samples nor its statistics."""
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=4, input_shape=SHAPE, norm="bn")
    sm, ctx = stack_model(model)  # type: ignore[misc]
    params = {k: torch.stack([v.detach()] * 2) for k, v in model.state_dict().items()}
    x = torch.randn(2, 6, *SHAPE)
    w = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    garbage = x.clone()
    garbage[1, 4:] = 1e3  # whatever sits in the padding
    a, stats_a = forward_stacked(sm, ctx, params, x, w, 4)
    b, stats_b = forward_stacked(sm, ctx, params, garbage, w, 4)
    assert torch.allclose(a[1, :4], b[1, :4], atol=1e-5)
    for name in stats_a:
        for sa, sb in zip(stats_a[name], stats_b[name], strict=True):
            assert torch.allclose(sa, sb, atol=1e-5)
    # ... and equal those of the real samples alone
    model.train()
    ref = model(x[1, :4])
    assert torch.allclose(a[1, :4], ref, atol=1e-5)


@pytest.mark.parametrize("track", [True, False])
def test_batchnorm_without_padding_takes_torch_batchnorm_and_gives_the_masked_result(track: bool) -> None:
    """A step whose batches are all full skips the masking (``full=True``): same outputs, same
    statistics (batch mean and unbiased variance per client), same gradients."""
    torch.manual_seed(0)
    model = build_model("heterofl_cnn", num_classes=4, input_shape=SHAPE, width=0.125, track_running_stats=track)
    sm, ctx = stack_model(model)  # type: ignore[misc]
    g = torch.Generator().manual_seed(1)
    base = {k: v.detach().double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    trainable = {k for k, _ in model.named_parameters()}
    x = torch.randn(3, 5, *SHAPE, generator=g, dtype=torch.float64)
    w = torch.ones(3, 5, dtype=torch.float64)
    out = {}
    for full in (False, True):
        params = {k: (torch.stack([v + 0.1 * i for i in range(3)]) if v.is_floating_point() else torch.stack([v] * 3))
                  .requires_grad_(k in trainable) for k, v in base.items()}
        logits, stats = forward_stacked(sm, ctx, params, x, w, 4, full=full)
        grads = torch.autograd.grad(logits.square().sum(), [v for v in params.values() if v.requires_grad])
        out[full] = (logits.detach(), stats, grads)
    assert torch.allclose(out[True][0], out[False][0], rtol=0, atol=1e-12)
    assert set(out[True][1]) == set(out[False][1]) and bool(out[True][1]) == track
    for name in out[True][1]:
        for a, b in zip(out[True][1][name], out[False][1][name], strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    for a, b in zip(out[True][2], out[False][2], strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


class _ChannelCentred(nn.Module):
    """Subtracts each sample's mean over all channels: per sample, yet across the stacked clients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(1, keepdim=True)


def _mixing_model(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **_: object) -> nn.Module:
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), _ChannelCentred(), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * input_shape[1] * input_shape[2], num_classes))


def test_check_catches_a_forward_that_mixes_clients() -> None:
    torch.manual_seed(0)
    model = _mixing_model(4, SHAPE)
    made = stack_model(model)
    assert not isinstance(made, str)
    why = check_stacked(model, *made, SHAPE, 4)
    assert why is not None and "differs" in why


@pytest.mark.parametrize("layer", [nn.Conv1d(1, 2, 3), nn.LayerNorm(4), nn.Embedding(5, 2)])
def test_layers_with_unknown_weights_are_refused_by_name(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Flatten(), layer)
    why = stack_model(model)
    assert isinstance(why, str) and "layer 1" in why and type(layer).__name__ in why


def _run_warned(vb: VectorizedBackend, tasks: list, times: int = 1) -> tuple[list, list[str]]:
    """The first run's results, and every warning the runs gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [vb.run(tasks) for _ in range(times)]
    return results[0], [str(w.message) for w in caught]


def test_backend_falls_back_to_vmap_once_and_still_matches_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS._items, "test_mixing", _mixing_model)
    store = make_store()
    spec = ModelSpec.make("test_mixing", 4, SHAPE)
    tasks = make_tasks(store, spec, LocalTrain(1, 16, adam(), 1e-3))
    vb = VectorizedBackend(store)
    vec, caught = _run_warned(vb, tasks, times=2)
    assert vb.path(spec) == "vmap"
    said = [m for m in caught if "trains through vmap" in m]
    assert len(said) == 1 and "differs" in said[0]
    assert vb.counts["vectorized"] == 2 * len(tasks)
    assert_close(SerialBackend(store).run(tasks), vec, 1e-5)


def _conv_dropout_model(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **_: object) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.4), nn.Conv2d(4, 3, 3, padding=1),
                         nn.Flatten(), nn.Linear(3 * h * w, num_classes))


@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_on_image_activations_stacks_only_when_not_channels_last(
        monkeypatch: pytest.MonkeyPatch, float64: None, channels_last: bool) -> None:
    """A mask is drawn in the memory order of its tensor. NCHW activations have one order, which the
    stacked path replays; channels-last ones have the order the preceding kernels chose, so such a
    model trains serially there, said once, rather than with other masks than serial's. (In float64
    equal masks leave only rounding; other masks differ by the update's size.)"""
    monkeypatch.setitem(MODELS._items, "test_conv_dropout", _conv_dropout_model)
    base = make_store()
    store = ClientStore(base.bundle, base.train_parts, channels_last=channels_last)
    spec = ModelSpec.make("test_conv_dropout", 4, SHAPE)
    tasks = make_tasks(store, spec, LocalTrain(2, 16, adam(), 1e-3))
    vb = VectorizedBackend(store)
    vec, caught = _run_warned(vb, tasks)
    serial = SerialBackend(store).run(tasks)
    said = [m for m in caught if "image activations" in m]
    if channels_last:
        assert vb.path(spec) == "serial" and vb.counts["vectorized"] == 0
        assert len(said) == 1 and "engine.memory_format=contiguous" in said[0]
    else:
        assert vb.path(spec) == "stacked" and vb.counts["vectorized"] == len(tasks) and not said
    assert_close(serial, vec, 1e-9)


def test_check_reports_a_device_without_per_client_random_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the generator cannot be swapped per client the check says so (and the backend keeps the
    model off the stacked path) instead of failing the run."""
    model = _zoo_model("lenet5", "none", 0.5)
    made = stack_model(model)
    assert not isinstance(made, str)

    def refuse(self: ClientRng, device: object, seeds: list[int]) -> None:
        raise ValueError("per-client dropout states on 'mps': only cpu and cuda are supported")

    monkeypatch.setattr(ClientRng, "__init__", refuse)
    why = check_stacked(model, *made, ZOO_SHAPE, 10)
    assert why is not None and "only cpu and cuda" in why
    plain = _zoo_model("lenet5", "none")  # without dropout no random states are asked for
    made_plain = stack_model(plain)
    assert not isinstance(made_plain, str)
    assert check_stacked(plain, *made_plain, ZOO_SHAPE, 10) is None
