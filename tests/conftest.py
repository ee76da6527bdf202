from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# Decoded-dataset caches (fedslim.data.datasets.user_cache_dir) of any test go to a folder of this
# session, never the user's ~/.cache.
_CACHE_HOME = tempfile.mkdtemp(prefix="fedslim-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> dict:
    """A federation small enough to run in a second: synthetic data, MLP, 4 clients, 3 rounds."""
    os.environ.pop("FEDSLIM_DATA", None)
    return {
        "name": "tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "num_clients": 4,
                 "options": {"num_samples": 400, "num_classes": 4, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "federation": {"rounds": 3, "participation": 0.5},
        "engine": {"progress": False},
    }


@pytest.fixture(scope="session")
def lenet_backend_cfg() -> Callable[..., dict]:
    """A factory of run configs for the backend tests: two rounds of 3 of 4 clients on synthetic data
    (no files), LeNet-5 with momentum SGD, on the given backend (and torch thread count, if given)."""
    def make(out: Path, backend: str, name: str, threads: int | None = None) -> dict:
        engine: dict = {"progress": False, "backend": backend}
        if threads is not None:
            engine["threads"] = threads
        return {
            "name": name, "seed": 3, "output_dir": str(out),
            "data": {"dataset": "synthetic", "num_clients": 4,
                     "options": {"num_samples": 400, "num_classes": 4, "shape": [1, 8, 8]}},
            "model": {"name": "lenet5"},
            "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
            "federation": {"rounds": 2, "participation": 0.75},
            "engine": engine,
        }
    return make


def _mlp_train_tasks(name: str, sizes: list[int], data_seed: int) -> tuple[object, list[object]]:
    """A client store of synthetic 1x8x8 samples, ``sizes[c]`` for client c, and one Adam train task
    per client (MLP, 3 classes, batch 8)."""
    from fedslim.config import OptimizerConfig
    from fedslim.data.types import DatasetBundle, TensorData
    from fedslim.engine.store import ClientStore
    from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec

    n = sum(sizes)
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    store = ClientStore(DatasetBundle(name, TensorData(x, y), TensorData(x[:4], y[:4]), 3, (1, 8, 8)),
                        list(torch.arange(n).split(sizes)))
    spec = ModelSpec.make("mlp", 3, (1, 8, 8))
    torch.manual_seed(0)
    state = spec.build().state_dict()
    tr = LocalTrain(1, 8, OptimizerConfig(name="adam", lr=1e-3), 1e-3)
    return store, [ClientTask(client=c, round=1, spec=spec, state=state, train=tr, seed=c)
                   for c in range(len(sizes))]


@pytest.fixture
def toy_tasks() -> tuple[object, list[object]]:
    """6 clients x 20 samples (see _mlp_train_tasks)."""
    return _mlp_train_tasks("toy", [20] * 6, data_seed=0)


@pytest.fixture
def masked_toy_tasks() -> tuple[object, list[object], dict[str, torch.Tensor]]:
    """The toy tasks, all sharing one random 0/1 mask of the MLP's weights (as AutoFLIP's round shares its
    pruning mask): (store, tasks, mask)."""
    store, tasks = _mlp_train_tasks("toy", [20] * 6, data_seed=0)
    g = torch.Generator().manual_seed(0)
    masks = {k: (torch.rand(v.shape, generator=g) < 0.5).float() for k, v in tasks[0].state.items()
             if k.endswith("weight")}
    for t in tasks:
        t.param_masks = masks
    return store, tasks, masks


@pytest.fixture
def uneven_tasks() -> tuple[object, list[object]]:
    """Clients of 16, 64, 8, 40, 24 and 56 samples (see _mlp_train_tasks): longest first, they go out
    as clients 1, 5, 3, 4, 0, 2."""
    return _mlp_train_tasks("uneven", [16, 64, 8, 40, 24, 56], data_seed=1)


@pytest.fixture
def one_long_task() -> tuple[object, list[object]]:
    """Client 0 with 6000 samples (750 steps), clients 1-3 with 8 (one step each), see
    _mlp_train_tasks."""
    return _mlp_train_tasks("one-long", [6000, 8, 8, 8], data_seed=2)


@pytest.fixture
def float64() -> Iterator[None]:
    """Default dtype float64 for the test: equivalence checks where only the algorithm, not float32
    rounding, can make two computations differ."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class RunKilled(Exception):
    """Raised inside a run by ``kill_run`` to stand for the process being killed."""


@pytest.fixture
def kill_run() -> Callable[[dict, int], None]:
    """``kill_run(cfg, round_)`` runs the config and stops it inside ``round_``, after its training and
    before its metrics are recorded, as a kill there would: the rounds before it are recorded and
    checkpointed, that one is not."""
    from fedslim.config import validate
    from fedslim.engine.run import Runner

    def run(cfg: dict, round_: int) -> None:
        runner = Runner(validate(cfg))
        original = runner._evaluate  # noqa: SLF001

        def evaluate(rnd: int) -> object:
            if rnd == round_:
                raise RunKilled
            return original(rnd)

        runner._evaluate = evaluate  # type: ignore[method-assign]
        with pytest.raises(RunKilled):
            runner.run()

    return run
