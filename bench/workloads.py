"""The benchmark's workloads, defined once so that every contender runs the same thing.

Every contender takes the data split, the model and its initial weights, each round's cohort and the
optimizer from here, through fedslim's own loader, partitioner and model zoo: the peers differ only in
the engine that runs the clients, which is what the benchmark measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    model: str
    algorithm: str
    clients: int = 50
    per_round: int = 25
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    rounds: int = 2
    dataset: str = "mnist"
    seed: int = 0
    max_steps: int | None = None  # cap on local steps per client update
    test_subset: int | None = None  # evaluate on the first N test images
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def participation(self) -> float:
        return self.per_round / self.clients

    def describe(self) -> str:
        levels = f" {self.params['model_split']}" if "model_split" in self.params else ""
        local = f"{self.max_steps} local steps" if self.max_steps else f"{self.epochs} local epoch(s)"
        return (f"{self.title}: {self.algorithm}{levels}, {self.clients} clients, {self.per_round}/round, "
                f"{local}, batch {self.batch_size}, Adam {self.lr:g}, {self.rounds} round(s)")


WORKLOADS = {
    # Two rounds (the seeds' setting runs 10): 25 updates of 5 epochs are ~2,400 optimizer steps, which
    # is 10-30 s per round per contender on a 2-core machine. The first round holds one-time work
    # (lazy imports, kernel generation), so the second is the steady-state figure.
    "lenet": Workload("lenet", "LeNet-5 / MNIST", "lenet5", "fedavg", rounds=2),
    # Five local steps per client: a full-width HeteroFL CNN step on 64 MNIST images is ~0.7 s on one
    # core here, so a local epoch (19 steps) for every client of a cohort would take minutes.
    "heterofl": Workload("heterofl", "HeteroFL CNN / MNIST", "heterofl_cnn", "heterofl", epochs=1, rounds=2,
                         max_steps=5, test_subset=1000,
                         params={"model_split": "a1-b1-c1-d1-e1", "bn_query_clients": "cohort",
                                 "bn_query_max_samples": 256}),
}


def fedslim_config(w: Workload, backend: str, data_dir: str, out: str, threads: int | None = None,
                   device: str = "cpu") -> dict:
    engine: dict[str, Any] = {"backend": backend, "device": device, "progress": False}
    if threads:
        engine["threads"] = threads
    return {
        "name": f"{w.name}-{backend}", "seed": w.seed, "output_dir": out,
        "data": {"dataset": w.dataset, "root": data_dir, "num_clients": w.clients, "partition": {"kind": "iid"},
                 "test_subset": w.test_subset},
        "model": {"name": w.model},
        "train": {"epochs": w.epochs, "batch_size": w.batch_size, "optimizer": {"name": "adam", "lr": w.lr},
                  "max_steps": w.max_steps},
        "federation": {"rounds": w.rounds, "participation": w.participation},
        "algorithm": {"name": w.algorithm, "params": dict(w.params)},
        "eval": {"every": 1}, "engine": engine,
    }


@dataclass
class Setup:
    """What a peer needs: data, split, cohorts, initial weights and each client's seed stream."""

    workload: Workload
    bundle: Any
    parts: list[torch.Tensor]
    cohorts: list[list[int]]
    init_state: dict[str, torch.Tensor]

    def client_seed(self, round_: int, client: int) -> int:
        from fedslim.rng import stream_seed

        return stream_seed(self.workload.seed, "train", round_, client)


def setup(w: Workload, data_dir: str) -> Setup:
    from fedslim.config import validate
    from fedslim.data.datasets import load_dataset
    from fedslim.data.partition import make_partition
    from fedslim.engine.run import sample_cohort
    from fedslim.engine.task import ModelSpec
    from fedslim.rng import stream_seed

    cfg = validate(fedslim_config(w, "serial", data_dir, "/tmp"))
    bundle = load_dataset(w.dataset, data_dir)
    parts = make_partition(bundle.train.y.numpy(), w.clients, cfg.data.partition, w.seed)
    cohorts = [sample_cohort(w.seed, r, w.clients, w.participation) for r in range(1, w.rounds + 1)]
    spec = ModelSpec.make(w.model, bundle.num_classes, bundle.input_shape)
    # As fedslim's RunContext.init_state: the same initial weights for every contender.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(w.seed, "init"))
        model = spec.build()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Setup(w, bundle, [torch.as_tensor(p, dtype=torch.long) for p in parts], cohorts, state)


def batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled batches, a final single sample folded into the batch before it (the rule
    fedslim's client procedure follows; it never fires for 1,200-sample clients at batch 64)."""
    perm = torch.randperm(n, generator=gen)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = torch.cat([out[-1], last])
    return out


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(y)


def as_dict(w: Workload) -> dict[str, Any]:
    return asdict(w)
