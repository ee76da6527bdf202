"""Model zoo: shapes across widths, sliceable sub-models, published sizes, MAC counting, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedslim.models import (
    MODELS,
    Scaler,
    build_model,
    count_macs,
    count_params,
    profile,
    profile_spec,
    scaled,
    set_bn_tracking,
)
from fedslim.models.mobilenet import NUM_EXPANDING
from fedslim.registry import UnknownNameError

MNIST, CIFAR, DIGITS = (1, 28, 28), (3, 32, 32), (1, 8, 8)
SUPPORTED: dict[str, list[tuple[int, int, int]]] = {
    "mlp": [MNIST, CIFAR, DIGITS],
    "twocnn": [MNIST, CIFAR, DIGITS],
    "lenet5": [MNIST, CIFAR, DIGITS],
    "alexnet": [MNIST, CIFAR, DIGITS],
    "vgg16": [CIFAR, (1, 32, 32)],
    "preresnet18": [MNIST, CIFAR, DIGITS],
    "mobilenetv2": [MNIST, CIFAR, DIGITS],
    "heterofl_cnn": [MNIST, CIFAR, DIGITS],
    "convbn9": [CIFAR, MNIST, DIGITS],
}
WIDTHS = (1.0, 0.5, 1 / 16)
NUM_CLASSES = 7  # not 10, so a hard-coded class count would show


def test_every_registered_model_is_covered():
    assert set(MODELS.names()) == set(SUPPORTED)


@pytest.mark.parametrize(("name", "shape"), [(n, s) for n, shapes in SUPPORTED.items() for s in shapes])
def test_logits_shape_at_every_width(name, shape):
    for width in WIDTHS:
        model = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=width)
        for mode in (model.train, model.eval):
            mode()
            out = model(torch.randn(3, *shape))
            assert out.shape == (3, NUM_CLASSES), (name, shape, width)
            assert torch.isfinite(out).all()


def _prefix(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_narrow_models_are_prefix_slices_of_the_wide_one(name):
    shape = SUPPORTED[name][0]
    wide = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=1.0)
    wide_sd = wide.state_dict()
    for width in (0.5, 1 / 16):
        narrow = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=width)
        narrow_sd = narrow.state_dict()
        assert narrow_sd.keys() == wide_sd.keys()
        assert count_params(narrow) < count_params(wide)
        for key, t in narrow_sd.items():
            assert t.dim() == wide_sd[key].dim(), key
            assert all(a <= b for a, b in zip(t.shape, wide_sd[key].shape, strict=True)), key
        # What HeteroFL-style algorithms do: cut the global tensors to the sub-model's shapes.
        narrow.load_state_dict({k: _prefix(wide_sd[k], t.shape) for k, t in narrow_sd.items()})
        narrow.eval()
        assert narrow(torch.randn(2, *shape)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_input_channels_and_classes_never_scale(name):
    shape = SUPPORTED[name][0]
    model = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=1 / 16)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first, last = layers[0], layers[-1]
    if isinstance(first, nn.Conv2d):
        assert first.in_channels == shape[0]
    else:
        assert first.in_features == math.prod(shape)
    assert isinstance(last, nn.Linear) and last.out_features == NUM_CLASSES


def test_width_rule_is_heterofl_ceil_never_below_one():
    assert scaled(64, 1 / 16) == 4
    assert scaled(200, 0.3) == 60
    assert scaled(6, 1 / 16) == 1
    assert scaled(6, 0.001) == 1
    assert scaled(192, 0.5) == 96
    model = build_model("heterofl_cnn", num_classes=10, input_shape=MNIST, width=1 / 16)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [4, 8, 16, 32]  # HeteroFL's hidden sizes at rate 1/16


def test_residual_shortcuts_do_not_depend_on_width():
    for width in WIDTHS:
        keys = build_model("preresnet18", num_classes=10, input_shape=CIFAR, width=width).state_dict().keys()
        assert "layer2.0.shortcut.weight" in keys
        assert "layer1.0.shortcut.weight" not in keys


# --- published sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "published"), [(1.0, 1.557e6), (1 / 16, 6.6e3)])
def test_heterofl_cnn_matches_published_mnist_sizes(width, published):
    model = build_model("heterofl_cnn", num_classes=10, input_shape=MNIST, width=width)
    assert count_params(model) == pytest.approx(published, rel=0.01)


def test_heterofl_preresnet18_matches_published_cifar10_size():
    # HeteroFL Table: PreResNet18 on CIFAR-10, rate 1: 9.6 M parameters.
    model = build_model("preresnet18", num_classes=10, input_shape=CIFAR)
    assert count_params(model) == pytest.approx(9.6e6, rel=0.01)
    standard = build_model("preresnet18", num_classes=10, input_shape=CIFAR, blocks="standard")
    assert count_params(standard) == pytest.approx(11.2e6, rel=0.01)


def test_mcmahan_models_match_published_mnist_sizes():
    # McMahan et al. 2017: 2NN 199,210 parameters; CNN 1,663,370 parameters.
    assert count_params(build_model("mlp", num_classes=10, input_shape=MNIST)) == 199_210
    assert count_params(build_model("twocnn", num_classes=10, input_shape=MNIST)) == 1_663_370


def test_lenet5_gives_the_same_16x5x5_features_on_28_and_32():
    for shape in (MNIST, (1, 32, 32)):
        model = build_model("lenet5", num_classes=10, input_shape=shape)
        first = model.features[0]
        assert first.padding == ((2, 2) if shape[1] == 28 else (0, 0))
        assert model.fc[0].in_features == 16 * 5 * 5
        assert count_params(model) == 61_706


# --- profiling -----------------------------------------------------------------------------------


def test_count_macs_of_single_layers_matches_formula():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_macs(conv, (3, 10, 12)) == 8 * 3 * 3 * 3 * 10 * 12
    strided = nn.Conv2d(4, 6, kernel_size=5, stride=2)  # 21x17 -> 9x7
    assert count_macs(strided, (4, 21, 17)) == 6 * 4 * 5 * 5 * 9 * 7
    depthwise = nn.Conv2d(16, 16, kernel_size=3, padding=1, groups=16)
    assert count_macs(depthwise, (16, 6, 6)) == 16 * 1 * 3 * 3 * 6 * 6
    assert count_macs(nn.Linear(20, 5), (20,)) == 20 * 5
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2)), (3, 4)) == 42


def test_count_macs_restores_mode_and_records_no_grad():
    model = build_model("heterofl_cnn", num_classes=10, input_shape=DIGITS)
    model.train()
    count_macs(model, DIGITS)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    count_macs(model, DIGITS)
    assert not model.training


def test_macs_shrink_roughly_quadratically_with_width():
    full = profile_spec("heterofl_cnn", 10, MNIST, 1.0)["macs"]
    half = profile_spec("heterofl_cnn", 10, MNIST, 0.5)["macs"]
    assert 0.2 < half / full < 0.3


def test_profile_spec_agrees_with_a_built_model_and_keeps_rng():
    shape = CIFAR
    model = build_model("mobilenetv2", num_classes=10, input_shape=shape, width=0.5)
    state = torch.get_rng_state()
    spec = profile_spec("mobilenetv2", 10, shape, 0.5)
    assert torch.equal(torch.get_rng_state(), state)  # profiling must not shift a seeded run
    assert spec["params"] == count_params(model)
    assert spec["macs"] == count_macs(model, shape)
    float_elems = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert spec["bytes_float32"] == 4 * float_elems
    static = profile_spec("mobilenetv2", 10, shape, 0.5, track_running_stats=False)
    assert static["bytes_float32"] == 4 * static["params"] < spec["bytes_float32"]


def test_profile_spec_is_cached_and_returns_fresh_dicts():
    a = profile_spec("lenet5", 10, DIGITS, 0.5, norm="bn", dropout=0.1)
    a["params"] = -1
    hits = profile._profile.cache_info().hits
    b = profile_spec("lenet5", 10, DIGITS, 0.5, dropout=0.1, norm="bn")  # option order irrelevant
    assert profile._profile.cache_info().hits == hits + 1
    assert b["params"] == count_params(build_model("lenet5", num_classes=10, input_shape=DIGITS, width=0.5,
                                                   norm="bn", dropout=0.1))


# --- HeteroFL pieces -----------------------------------------------------------------------------


def test_scaler_divides_in_training_and_is_identity_in_eval():
    s = Scaler(0.25)
    x = torch.randn(4, 3)
    s.train()
    assert torch.allclose(s(x), x * 4)
    s.eval()
    assert torch.equal(s(x), x)
    assert dict(s.state_dict()) == {}


def test_scaler_rate_option_reaches_every_scaler():
    model = build_model("preresnet18", num_classes=10, input_shape=DIGITS, width=0.5, scaler_rate=0.5)
    rates = [m.rate for m in model.modules() if isinstance(m, Scaler)]
    assert rates and all(r == 0.5 for r in rates)
    # Scaler sits before each norm, so with BN the per-channel normalisation cancels it, but without a
    # norm it changes the training-mode output.
    plain = build_model("heterofl_cnn", num_classes=10, input_shape=DIGITS, norm="none")
    scaled_model = build_model("heterofl_cnn", num_classes=10, input_shape=DIGITS, norm="none", scaler_rate=0.5)
    scaled_model.load_state_dict(plain.state_dict())
    x = torch.randn(2, *DIGITS)
    plain.eval(), scaled_model.eval()
    assert torch.allclose(scaled_model(x), plain(x))
    plain.train(), scaled_model.train()
    assert not torch.allclose(scaled_model(x), plain(x))


@pytest.mark.parametrize("name", ["vgg16", "preresnet18", "mobilenetv2", "heterofl_cnn"])
def test_static_bn_keeps_no_running_buffers(name):
    shape = SUPPORTED[name][0]
    model = build_model(name, num_classes=10, input_shape=shape, width=0.5, track_running_stats=False)
    keys = model.state_dict().keys()
    assert not any("running_mean" in k or "running_var" in k or "num_batches_tracked" in k for k in keys)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    tracked = build_model(name, num_classes=10, input_shape=shape, width=0.5)
    assert any("running_mean" in k for k in tracked.state_dict())
    # Same parameters either way, so the server can move weights between the two modes.
    assert {k for k, _ in model.named_parameters()} == {k for k, _ in tracked.named_parameters()}


def test_set_bn_tracking_switches_modes_and_accepts_installed_statistics():
    torch.manual_seed(0)
    model = build_model("heterofl_cnn", num_classes=10, input_shape=DIGITS, track_running_stats=False)
    x = torch.randn(8, *DIGITS)
    model.eval()
    batch_stats_out = model(x)
    set_bn_tracking(model, True)
    sd = model.state_dict()
    assert torch.equal(sd["blocks.2.running_mean"], torch.zeros(64))
    assert torch.equal(sd["blocks.2.running_var"], torch.ones(64))
    # Installed statistics are what eval mode now uses.
    stats = {k: (torch.full_like(v, 3.0) if k.endswith("running_mean") else v) for k, v in sd.items()}
    model.load_state_dict(stats)
    assert not torch.allclose(model(x), batch_stats_out, atol=1e-4)
    set_bn_tracking(model, False)
    assert not any("running" in k for k in model.state_dict())
    assert torch.allclose(model(x), batch_stats_out, atol=1e-5)


# --- options and errors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_norm_options_build_and_none_drops_norm_parameters(name):
    shape = SUPPORTED[name][0]
    counts = {}
    for norm in ("bn", "gn", "none"):
        model = build_model(name, num_classes=10, input_shape=shape, width=1 / 16, norm=norm)
        assert model(torch.randn(2, *shape)).shape == (2, 10)
        counts[norm] = count_params(model)
        has = {type(m) for m in model.modules()}
        assert (nn.GroupNorm in has) == (norm == "gn")
        assert bool(has & {nn.BatchNorm1d, nn.BatchNorm2d}) == (norm == "bn")
    assert counts["none"] < counts["bn"] == counts["gn"]


def test_unknown_model_name_names_the_field():
    with pytest.raises(UnknownNameError) as err:
        build_model("lenet", num_classes=10, input_shape=MNIST)
    msg = str(err.value)
    assert msg.startswith("model.name:") and "lenet5" in msg


def test_unknown_option_names_the_field_and_lists_allowed():
    with pytest.raises(ValueError) as err:
        build_model("lenet5", num_classes=10, input_shape=MNIST, x=1)
    msg = str(err.value)
    assert msg.startswith("model.options: unknown option 'x' for model 'lenet5'; allowed: ")
    assert "norm" in msg and "scaler_rate" in msg


@pytest.mark.parametrize(("option", "value"), [("norm", "ln"), ("dropout", 1.5), ("scaler_rate", 0),
                                               ("track_running_stats", "no"), ("blocks", "wide")])
def test_bad_option_values_name_the_option(option, value):
    with pytest.raises(ValueError, match=rf"model\.options\.{option}:"):
        build_model("preresnet18", num_classes=10, input_shape=CIFAR, **{option: value})


def test_bad_width_and_classes_are_rejected():
    with pytest.raises(ValueError, match="model.width"):
        build_model("mlp", num_classes=10, input_shape=DIGITS, width=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", num_classes=0, input_shape=DIGITS)


@pytest.mark.parametrize(("name", "shape", "minimum"), [("vgg16", DIGITS, "32x32"), ("vgg16", MNIST, "32x32"),
                                                        ("heterofl_cnn", (1, 7, 7), "8x8"),
                                                        ("twocnn", (1, 3, 3), "4x4")])
def test_too_small_inputs_give_a_clear_error(name, shape, minimum):
    with pytest.raises(ValueError, match=rf"model '{name}'.*too small.*at least {minimum}"):
        build_model(name, num_classes=10, input_shape=shape)


def test_conv_models_need_a_chw_shape():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("lenet5", num_classes=10, input_shape=(28, 28))


def test_mobilenetv2_hidden_channels_option():
    hidden = tuple(range(3, 3 + NUM_EXPANDING))
    model = build_model("mobilenetv2", num_classes=10, input_shape=DIGITS, hidden_channels=hidden)
    depthwise = [m.out_channels for m in model.modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise[1:] == list(hidden)  # the first block does not expand
    assert depthwise[0] == 32
    assert model(torch.randn(2, *DIGITS)).shape == (2, 10)
    assert profile_spec("mobilenetv2", 10, DIGITS, hidden_channels=list(hidden))["params"] == count_params(model)
    with pytest.raises(ValueError, match="model.options.hidden_channels"):
        build_model("mobilenetv2", num_classes=10, input_shape=DIGITS, hidden_channels=(4, 4))


def test_construction_is_deterministic_given_the_seed():
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model("preresnet18", num_classes=10, input_shape=DIGITS, width=0.25).state_dict()

    a, b, c = build(1), build(1), build(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dropout_option_is_active_only_in_training():
    model = build_model("alexnet", num_classes=10, input_shape=DIGITS, width=1 / 16, dropout=0.5)
    x = torch.randn(4, *DIGITS)
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))
