"""QA regressions for the model zoo: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedslim.models import build_model, count_params, profile_spec, scaled

CIFAR, MNIST = (3, 32, 32), (1, 28, 28)


@pytest.mark.parametrize("value", [["heterofl"], {"a": 1}, 2])
def test_preresnet18_blocks_of_the_wrong_type_names_the_option(value):
    # A YAML list or mapping used to reach `value in BLOCKS` and raise "unhashable type: 'list'".
    with pytest.raises(ValueError, match=r"model\.options\.blocks: must be one of heterofl, standard") as err:
        build_model("preresnet18", num_classes=10, input_shape=CIFAR, blocks=value)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(("base", "width", "expected"),
                         [(200, 0.55, 110), (200, 0.07, 14), (100, 0.07, 7), (200, 1.1, 220), (200, 0.14, 28),
                          (64, 1 / 16, 4), (200, 0.551, 111), (6, 0.001, 1)])
def test_width_rule_is_not_fooled_by_float_noise(base, width, expected):
    # 0.55 * 200 == 110.00000000000001 in floating point; ceil used to give 111.
    assert scaled(base, width) == expected


def test_mlp_at_width_055_has_110_hidden_units_and_its_profile_says_so():
    model = build_model("mlp", num_classes=10, input_shape=MNIST, width=0.55)
    hidden = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    assert hidden == [110, 110]
    expected = (784 * 110 + 110) + (110 * 110 + 110) + (110 * 10 + 10)
    assert count_params(model) == expected
    assert profile_spec("mlp", 10, MNIST, 0.55)["params"] == expected


@pytest.mark.parametrize("name", ["lenet5", "mlp", "preresnet18"])
def test_numpy_integer_input_shape_is_accepted(name):
    # num_classes accepted NumPy integers but input_shape did not: the message then read
    # "expects input_shape (C, H, W) with positive integers, got (np.int64(1), np.int64(28), ...)".
    import numpy as np

    shape = tuple(np.array(MNIST))
    model = build_model(name, num_classes=np.int64(10), input_shape=shape)
    assert model(torch.zeros(2, *MNIST)).shape == (2, 10)
    assert count_params(model) == count_params(build_model(name, num_classes=10, input_shape=MNIST))


@pytest.mark.parametrize("shape", [(1, True, 28), (1.0, 28, 28), (1, 0, 28)])
def test_non_integer_input_shape_is_still_refused(shape):
    for name in ("lenet5", "mlp"):
        with pytest.raises(ValueError, match="input_shape"):
            build_model(name, num_classes=10, input_shape=shape)


@pytest.mark.parametrize(("option", "value"), [("norm", {"a": 1}), ("blocks", {"a": 1})])
def test_profile_spec_names_the_option_for_a_mapping_value(option, value):
    # The cache key used to fail first with "TypeError: unhashable type: 'dict'".
    with pytest.raises(ValueError, match=rf"model\.options\.{option}: must be one of"):
        profile_spec("preresnet18", 10, CIFAR, **{option: value})


@pytest.mark.parametrize("width", [True, "0.5"])
def test_profile_spec_refuses_widths_build_model_refuses(width):
    # float() used to turn True into 1.0 and "0.5" into 0.5, profiling a model build_model refuses.
    with pytest.raises(ValueError, match=r"model\.width: must be a finite number > 0"):
        profile_spec("mlp", 10, MNIST, width)
    with pytest.raises(ValueError, match=r"model\.width"):
        build_model("mlp", num_classes=10, input_shape=MNIST, width=width)


def test_mobilenetv2_hidden_channels_accepts_numpy_integers():
    # e.g. a DAC search's channel counts as a NumPy array: was refused as "must be 16 positive integers".
    import numpy as np

    from fedslim.models.mobilenet import NUM_EXPANDING

    hidden = np.full(NUM_EXPANDING, 8)
    model = build_model("mobilenetv2", num_classes=10, input_shape=CIFAR, hidden_channels=list(hidden))
    ref = build_model("mobilenetv2", num_classes=10, input_shape=CIFAR, hidden_channels=[8] * NUM_EXPANDING)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.options\.hidden_channels: must be 16 positive integers"):
        build_model("mobilenetv2", num_classes=10, input_shape=CIFAR, hidden_channels=[8.0] * NUM_EXPANDING)
