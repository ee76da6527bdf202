"""QA regressions for the model zoo: each test failed before its fix."""

from __future__ import annotations

import pytest

from fedslim.models import build_model

CIFAR = (3, 32, 32)


@pytest.mark.parametrize("value", [["heterofl"], {"a": 1}, 2])
def test_preresnet18_blocks_of_the_wrong_type_names_the_option(value):
    # A YAML list or mapping used to reach `value in BLOCKS` and raise "unhashable type: 'list'".
    with pytest.raises(ValueError, match=r"model\.options\.blocks: must be one of heterofl, standard") as err:
        build_model("preresnet18", num_classes=10, input_shape=CIFAR, blocks=value)
    assert repr(value) in str(err.value)
