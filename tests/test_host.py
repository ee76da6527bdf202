"""Host settings of client training (fedslim.engine.host): channels-last models and batches compute what
NCHW ones do, deltas come back in the plain layout, fused optimizers, the allocator settings, and
the config field that picks the layout."""

from __future__ import annotations

import platform

import pytest
import torch

from fedslim.config import ConfigError, OptimizerConfig, validate
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.backends import SerialBackend
from fedslim.engine.client import build_optimizer
from fedslim.engine.host import tune_malloc, use_channels_last
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec


def test_auto_layout_is_channels_last_for_images_on_cpu_only() -> None:
    assert use_channels_last("auto", "cpu", (3, 32, 32))
    assert not use_channels_last("auto", "cuda", (3, 32, 32))
    assert not use_channels_last("auto", "cpu", (784,))  # not an image: nothing to lay out
    assert use_channels_last("channels_last", "cuda", (1, 28, 28))
    assert not use_channels_last("contiguous", "cpu", (3, 32, 32))
    with pytest.raises(ValueError, match="engine.memory_format.*allowed: auto, channels_last, contiguous"):
        use_channels_last("nhwc", "cpu", (3, 32, 32))


def test_config_names_the_allowed_layouts() -> None:
    with pytest.raises(ConfigError, match="engine.memory_format"):
        validate({"engine": {"memory_format": "nhwc"}})
    assert validate({}).engine.memory_format == "auto"


def _train(channels_last: bool) -> tuple[list, torch.nn.Module, ClientStore]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 12, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    store = ClientStore(DatasetBundle("toy", TensorData(x, y), TensorData(x[:4], y[:4]), 4, (3, 12, 12)),
                        list(torch.arange(96).chunk(3)), channels_last=channels_last)
    spec = ModelSpec.make("lenet5", 4, (3, 12, 12), norm="bn")
    torch.manual_seed(0)
    state = spec.build().state_dict()
    # SGD, not Adam: under BatchNorm a conv bias's gradient is rounding noise, which Adam's step
    # normalisation would blow up to +-lr whichever way the layout rounds it.
    tr = LocalTrain(2, 8, OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), 0.05)
    backend = SerialBackend(store)
    tasks = [ClientTask(client=c, round=1, spec=spec, state=state, train=tr, seed=c) for c in range(3)]
    return backend.run(tasks), backend.buffers.get(spec), store


def test_channels_last_training_matches_nchw_and_returns_plain_deltas() -> None:
    nhwc, model, store = _train(channels_last=True)
    nchw, plain_model, _ = _train(channels_last=False)
    conv = model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain_model.features[0].weight.is_contiguous()
    assert store.get(0).x.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(nhwc, nchw, strict=True):
        assert a.delta.keys() == b.delta.keys()
        for k in a.delta:
            assert a.delta[k].is_contiguous(), k  # codecs flatten deltas with view(-1)
            torch.testing.assert_close(a.delta[k], b.delta[k], rtol=1e-4, atol=1e-5)


def test_optimizers_use_torch_fused_steps_on_cpu() -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    for name in ("sgd", "adam"):
        opt = build_optimizer(params, LocalTrain(1, 8, OptimizerConfig(name=name, lr=0.1, momentum=0.9), 0.1))
        assert opt.defaults["fused"] is True, name


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_settings_apply_on_glibc() -> None:
    assert tune_malloc() is True
