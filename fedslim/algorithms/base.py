"""The algorithm interface: a few hooks, in the spirit of Flower's Strategy and pfl's algorithms.

An algorithm owns its global model(s) and decides what each sampled client does (``plan``) and how
results merge (``aggregate``). The engine does everything else: sampling, codecs and byte counts,
running tasks on a backend, evaluation, simulated time, records and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fedslim.config import RunConfig
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.devices import DevicePopulation
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, ModelSpec, State
from fedslim.rng import stream_seed


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def scheduled_lr(cfg: RunConfig, round_: int) -> float:
    """Client learning rate for a 1-based round."""
    s, lr, r = cfg.train.schedule, cfg.train.optimizer.lr, round_ - 1
    if s.kind == "exponential":
        return lr * s.gamma ** r
    if s.kind == "step":
        return lr * s.gamma ** (r // s.step_size)
    if s.kind == "multistep":
        return lr * s.gamma ** sum(1 for m in s.milestones if round_ >= m)
    if s.kind == "cosine":
        return s.min_lr + (lr - s.min_lr) * (1 + math.cos(math.pi * r / max(cfg.federation.rounds, 1))) / 2
    return lr


@dataclass
class RunContext:
    """What an algorithm may use. Everything here is derived from the config and the seed."""

    cfg: RunConfig
    bundle: DatasetBundle
    store: ClientStore
    devices: DevicePopulation
    backend: Any  # fedslim.engine.backends.Backend
    run_dir: Path
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def num_clients(self) -> int:
        return self.store.num_clients

    def spec(self, width: float | None = None, **options: Any) -> ModelSpec:
        """The configured model at ``width`` (default: the configured width)."""
        m = self.cfg.model
        opts = {**m.options, **options}
        return ModelSpec.make(m.name, self.bundle.num_classes, self.bundle.input_shape,
                              m.width if width is None else width, **opts)

    def init_state(self, spec: ModelSpec, purpose: str = "init") -> State:
        """Seeded initial weights for ``spec`` (independent of global RNG state)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, purpose))
            model = spec.build()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def local_train(self, round_: int) -> LocalTrain:
        t = self.cfg.train
        return LocalTrain(t.epochs, t.batch_size, t.optimizer, scheduled_lr(self.cfg, round_), t.grad_clip,
                          t.max_steps, t.augment)

    def task_seed(self, round_: int, client: int, purpose: str = "train") -> int:
        return stream_seed(self.seed, purpose, round_, client)

    def train_task(self, round_: int, client: int, spec: ModelSpec, state: State, **kw: Any) -> ClientTask:
        return ClientTask(client=client, round=round_, spec=spec, state=state, train=self.local_train(round_),
                          seed=self.task_seed(round_, client), **kw)

    def evaluate(self, spec: ModelSpec, state: State, data: TensorData | None = None,
                 label_mask: torch.Tensor | None = None) -> dict[str, float]:
        from fedslim.metrics import evaluate

        model = spec.build().to(self.device)
        model.load_state_dict(state)
        data = self.bundle.test if data is None else data
        return evaluate(model, data.to(self.device), self.bundle.num_classes, batch_size=self.cfg.eval.batch_size,
                        topk=self.cfg.eval.topk, label_mask=label_mask)

    def note(self, msg: str) -> None:
        """A message for the user (printed and kept in the summary)."""
        self.notes.append(msg)


class Algorithm:
    """Override ``setup``, ``plan`` and ``aggregate``; the rest has sensible defaults."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, ctx: RunContext, params: BaseModel):
        self.ctx = ctx
        self.params = params
        # Wall-clock seconds of named phases an algorithm runs inside a hook (e.g. HeteroFL's BN query
        # inside aggregate): the engine moves them out of that hook's time into timings.jsonl.
        self.phase_seconds: dict[str, float] = {}

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Raise ValueError('field: message') for combinations this algorithm cannot run."""

    def setup(self) -> None:
        raise NotImplementedError

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        raise NotImplementedError

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        raise NotImplementedError

    def eval_targets(self, round_: int) -> dict[str, tuple[ModelSpec, State]]:
        """Models to evaluate on the central test set, by label ('global', or one per width level)."""
        raise NotImplementedError

    def local_eval_tasks(self, round_: int, clients: list[int]) -> list[ClientTask]:
        """Tasks evaluating each client's model on its local test split (default: the global model)."""
        spec, state = next(iter(self.eval_targets(round_).values()))
        return [ClientTask(client=c, round=round_, spec=spec, state=state, kind="evaluate",
                           extras={"split": "test", "batch_size": self.ctx.cfg.eval.batch_size})
                for c in clients]

    def finalize(self) -> dict[str, Any]:
        """Work after the last round (e.g. a compression ladder); returns summary entries."""
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
