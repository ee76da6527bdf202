"""Backends run a cohort's client tasks. They differ in where, never in what they compute."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fedslim.engine.host import memory_format
from fedslim.engine.rewrite import avoid_narrow_strided_pointwise, pad_narrow_channels, pool_before_activation
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec
from fedslim.registry import BACKENDS, CLIENT_PROCEDURES


class Backend(Protocol):
    def run(self, tasks: list[ClientTask]) -> list[ClientResult]: ...

    def close(self) -> None: ...


class ModelBuffers:
    """One reusable model per spec (pfl-style): tasks overwrite its weights instead of rebuilding it.
    ``rewrite``: apply fedslim.engine.rewrite's rewrites (off only to measure what they save);
    ``pad_channels``: among them, pad narrow channels (channels-last on the CPU only, where it pays;
    off where the model is restacked: the stacked model knows plain layers only)."""

    def __init__(self, device: str = "cpu", channels_last: bool = False, rewrite: bool = True,
                 pad_channels: bool = True):
        self.device = device
        self.rewrite = rewrite
        self.pad_channels = pad_channels and channels_last and torch.device(device).type == "cpu"
        self.memory_format = memory_format(channels_last)
        self._models: dict[ModelSpec, nn.Module] = {}

    def get(self, spec: ModelSpec) -> nn.Module:
        m = self._models.get(spec)
        if m is None:
            # memory_format applies to 4-d weights only; load_state_dict later copies into this layout.
            m = spec.build().to(self.device, memory_format=self.memory_format)
            if self.memory_format == torch.channels_last and torch.device(self.device).type == "cpu":
                avoid_narrow_strided_pointwise(m)  # not optional: the kernel it avoids corrupts memory
            if self.rewrite:
                pool_before_activation(m)
                if self.pad_channels:
                    pad_narrow_channels(m)
            self._models[spec] = m
        return m


def run_one(task: ClientTask, store: ClientStore, buffers: ModelBuffers) -> ClientResult:
    proc = CLIENT_PROCEDURES.get(task.kind)
    data = store.get(task.client, task.extras.get("split", "train"))
    return proc(task, data, buffers.get(task.spec))


@BACKENDS.register("serial", "one client after another in this process (auto: on 1 core, or engine.threads > 1)")
class SerialBackend:
    def __init__(self, store: ClientStore, device: str = "cpu", *, rewrite: bool = True, pad_channels: bool = True,
                 **_: object):
        self.store = store
        self.buffers = ModelBuffers(device, store.channels_last, rewrite, pad_channels)

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        return [run_one(t, self.store, self.buffers) for t in tasks]

    def close(self) -> None:
        pass
