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

from fedslim.config import ConfigError, DeviceTier, RunConfig
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.devices import DevicePopulation
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, ModelSpec, State
from fedslim.rng import stream_seed

# Where devices.tiers budgets (model_bytes, memory_mb) and widths decide what a device gets; named in the
# errors of the algorithms that send one model to every device.
BUDGET_ALGORITHMS = ("hybridcomp (capable: false tiers get the most accurate compressed model within their "
                     "budget) or heterofl / fedrolex / fed_dropout (each tier trains a sub-model at its width)")


def check_tiers(cfg: RunConfig, algorithm: str, *, reads_width: bool, reads_capable: bool) -> None:
    """Refuse devices.tiers settings ``algorithm`` would silently ignore: a width other than 1 when it
    gives every device the same model, ``capable: false`` when it trains on every device."""
    for i, t in enumerate(cfg.devices.tiers):
        if not reads_width and t.width != 1:
            raise ValueError(
                f"devices.tiers.{i}.width: {algorithm} gives every device the same model (model.width "
                f"{cfg.model.width:g}), so the width {t.width:g} of tier {t.name!r} would be ignored; allowed "
                f"here: 1 (the default). For a narrower model per tier use heterofl, fedrolex or fed_dropout; "
                f"to shrink every device's model, set model.width")
        if not reads_capable and not t.capable:
            raise ValueError(
                f"devices.tiers.{i}.capable: {algorithm} trains on every device, so 'capable: false' on tier "
                f"{t.name!r} would be ignored; allowed here: true (the default). Devices that do not train and "
                f"get a compressed model instead are algorithm hybridcomp's")


def activation_bytes(spec: Any, batch: int = 1) -> int:
    """Float32 activation memory of batch-``batch`` inference when every activation is freed once the
    next layer has consumed it: the largest input + output of any leaf module (meta tensors, no compute)."""
    with torch.device("meta"):
        model = spec.build()
    model.eval()
    peak = 0

    def hook(_m: torch.nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        nonlocal peak
        n = sum(t.numel() for t in inp if isinstance(t, torch.Tensor))
        n += out.numel() if isinstance(out, torch.Tensor) else 0
        peak = max(peak, n)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros((batch, *spec.input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return 4 * peak


def budget_shortfall(i: int, tier: DeviceTier, what: str, spec: ModelSpec, state: State) -> str | None:
    """Why tier ``i`` cannot hold ``what`` (``spec`` with weights ``state``), or None when it can (or sets
    no budget). The model's size is its exact (float32) encoding, as sent with no codec; memory is that
    plus the float32 activations of batch-1 inference, a lower bound of what training needs, so only a
    budget that surely cannot run the model is refused (the same measure HybridCompFL's memory budget
    uses)."""
    from fedslim.codecs import pack_exact

    if tier.model_bytes is None and tier.memory_mb is None:
        return None
    size = len(pack_exact(state))
    if tier.model_bytes is not None and size > tier.model_bytes:
        return (f"devices.tiers.{i}.model_bytes: tier {tier.name!r} holds at most {tier.model_bytes:,} B, but "
                f"{what} is {size:,} B (float32, as sent with no codec)")
    if tier.memory_mb is not None:
        act = activation_bytes(spec)
        if size + act > tier.memory_mb * 1e6:
            return (f"devices.tiers.{i}.memory_mb: tier {tier.name!r} has {tier.memory_mb:g} MB "
                    f"({tier.memory_mb * 1e6:,.0f} B), but {what} needs at least {size + act:,} B ({size:,} B "
                    f"of float32 weights + {act:,} B of batch-1 activations; training needs more)")
    return None


def refuse_budget(reason: str, remedy: str) -> None:
    """A tier budget a model cannot meet: a config error, raised before the run folder is made."""
    raise ConfigError(f"{reason}; {remedy}")


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
    # Why a resumed run may not change federation.rounds (None: it may): set by an algorithm that
    # plans from the total number of rounds, so a run given other totals would not be the same run.
    rounds_fixed: ClassVar[str | None] = None

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
