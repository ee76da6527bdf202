"""The process backend (forked long-lived workers): same numbers as serial, a worker killed mid-round is
retried without losing or double-counting an update, no process outlives close(), auto picks it on a
multi-core CPU."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedslim.algorithms.fedavg import FedAvg
from fedslim.config import validate
from fedslim.data.types import TensorData
from fedslim.engine import process_backend
from fedslim.engine.backends import SerialBackend
from fedslim.engine.process_backend import FAIL_ONCE_EXTRA, ProcessBackend
from fedslim.engine.run import Runner
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask
from fedslim.engine.vectorized import auto_backend
from fedslim.registry import CLIENT_PROCEDURES
from fedslim.results import read_jsonl


def _heterofl_cfg(out: Path, backend: str, name: str) -> dict:
    """HeteroFL with two widths, static-BN queries (bn_stats tasks) and local evaluation (evaluate tasks)."""
    return {
        "name": name, "seed": 5, "output_dir": str(out),
        "data": {"dataset": "synthetic", "num_clients": 8, "local_test_fraction": 0.2,
                 "partition": {"kind": "pathological", "classes_per_client": 2},
                 "options": {"num_samples": 320, "test_samples": 100, "num_classes": 5, "shape": [1, 8, 8],
                             "separation": 0.6}},
        "model": {"name": "heterofl_cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 16,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "federation": {"rounds": 2, "participation": 0.5},
        "algorithm": {"name": "heterofl", "params": {"model_split": "a1-e1"}},
        "eval": {"local": True},
        "engine": {"progress": False, "backend": backend, "threads": 1},
    }


def _run(cfg: dict) -> tuple[Runner, list[dict]]:
    runner = Runner(validate(cfg), out=open(os.devnull, "w"))  # noqa: SIM115
    runner.run()
    return runner, read_jsonl(runner.run_dir / "metrics.jsonl")


def _gone(pids: list[int]) -> bool:
    """No such process, or not one of ours any more (reaped and the pid reused elsewhere)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid():
            return False
    return True


@pytest.fixture(scope="module")
def serial_rows(tmp_path_factory: pytest.TempPathFactory, lenet_backend_cfg: Callable[..., dict]) -> list[dict]:
    return _run(lenet_backend_cfg(tmp_path_factory.mktemp("serial"), "serial", "s", threads=1))[1]


@pytest.fixture
def toy(toy_tasks: tuple[ClientStore, list[ClientTask]]) -> tuple[ClientStore, list[ClientTask]]:
    return toy_tasks


def _same(a: list[ClientResult], b: list[ClientResult]) -> None:
    assert [r.client for r in a] == [r.client for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.loss == y.loss and x.num_steps == y.num_steps and x.num_samples == y.num_samples
        assert x.delta.keys() == y.delta.keys() and all(torch.equal(x.delta[k], y.delta[k]) for k in x.delta)


def test_process_run_equals_serial_run(serial_rows: list[dict], tmp_path: Path,
                                       lenet_backend_cfg: Callable[..., dict]) -> None:
    runner, rows = _run(lenet_backend_cfg(tmp_path, "process", "p", threads=1))
    assert isinstance(runner.backend, ProcessBackend)
    assert rows == serial_rows  # losses, accuracies, byte counts: bit for bit
    assert not mp.active_children()


def test_heterofl_run_equals_serial_run(tmp_path: Path) -> None:
    _, serial = _run(_heterofl_cfg(tmp_path, "serial", "s"))
    runner, rows = _run(_heterofl_cfg(tmp_path, "process", "p"))
    assert isinstance(runner.backend, ProcessBackend)
    assert rows == serial
    # Not vacuous: bn_stats tasks (static BN) and evaluate tasks (local accuracy) ran in the workers too.
    assert all(r["bn_query"]["clients"] == 8 and r["local"]["all"]["clients"] == 8 for r in rows)
    assert set(rows[0]["eval"]) == {"a", "e"}
    assert not mp.active_children()


def test_worker_killed_mid_round_is_retried(serial_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            lenet_backend_cfg: Callable[..., dict]) -> None:
    marker = tmp_path / "worker-died"
    plan = FedAvg.plan

    def plan_with_a_crash(self: FedAvg, round_: int, cohort: list[int]) -> list[ClientTask]:
        tasks = plan(self, round_, cohort)
        if round_ == 2:
            tasks[1].extras[FAIL_ONCE_EXTRA] = str(marker)
        return tasks

    monkeypatch.setattr(FedAvg, "plan", plan_with_a_crash)
    runner, crashed = _run(lenet_backend_cfg(tmp_path, "process", "p", threads=1))
    assert marker.exists(), "the fault was not injected"
    assert isinstance(runner.backend, ProcessBackend) and runner.backend.retries == 1
    assert crashed == serial_rows  # every update of round 2 counted once, none lost
    assert not mp.active_children()


def test_backend_retries_on_a_fresh_worker_and_leaves_no_process(toy: tuple[ClientStore, list[ClientTask]],
                                                                 tmp_path: Path) -> None:
    store, tasks = toy
    expected = SerialBackend(store).run(tasks)
    tasks[4].extras[FAIL_ONCE_EXTRA] = str(tmp_path / "died")
    backend = ProcessBackend(store, workers=2)
    try:
        first = backend.run(tasks[:2])  # the pool starts with the first round and persists
        before = backend.worker_pids()
        got = backend.run(tasks)
        after = backend.worker_pids()
    finally:
        backend.close()
    dead = int((tmp_path / "died").read_text())
    assert dead in before and dead not in after and len(after) == 2
    assert backend.retries == 1
    _same(expected[:2], first)
    _same(expected, got)
    assert backend.num_workers == 0 and not mp.active_children() and _gone(before + after)


@pytest.mark.parametrize(("dispatch", "order"), [("longest_first", [1, 5, 3, 4, 0, 2]),
                                                  ("in_order", [0, 1, 2, 3, 4, 5])])
def test_longest_tasks_go_out_first_and_results_stay_in_task_order(
        uneven_tasks: tuple[ClientStore, list[ClientTask]], dispatch: str, order: list[int]) -> None:
    store, tasks = uneven_tasks
    expected = SerialBackend(store).run(tasks)
    backend = ProcessBackend(store, cfg=SimpleNamespace(engine=SimpleNamespace(threads=1, dispatch=dispatch)),
                             workers=2)
    try:
        got = backend.run(tasks)
    finally:
        backend.close()
    assert backend.last_dispatch == order
    _same(expected, got)


def _always_crash(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    os._exit(3)


def _fails(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    raise ZeroDivisionError(f"client {task.client} divided by zero")


def _where(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    return ClientResult(task.client, task.round, {}, len(data), extras={"pid": os.getpid()})


def test_a_task_that_keeps_killing_its_worker_fails_after_three_tries(
        toy: tuple[ClientStore, list[ClientTask]], monkeypatch: pytest.MonkeyPatch) -> None:
    store, tasks = toy
    monkeypatch.setitem(CLIENT_PROCEDURES._items, "test_crash", _always_crash)
    tasks[3].kind = "test_crash"
    backend = ProcessBackend(store, workers=2)
    try:
        with pytest.raises(RuntimeError, match=r"client 3 of round 1 failed 3 times.*worker process died"):
            backend.run(tasks)
        pids = backend.worker_pids()
        assert backend.retries == 2 and backend.num_workers == 0  # the pool was shut down with the error
    finally:
        backend.close()
    assert not pids and not mp.active_children()


def test_a_procedure_error_is_raised_as_itself(toy: tuple[ClientStore, list[ClientTask]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store, tasks = toy
    monkeypatch.setitem(CLIENT_PROCEDURES._items, "test_fails", _fails)
    tasks[2].kind = "test_fails"
    backend = ProcessBackend(store, workers=2)
    try:
        with pytest.raises(ZeroDivisionError, match="client 2 divided by zero") as info:
            backend.run(tasks)
        assert any("process-backend worker" in n for n in info.value.__notes__)
        assert not mp.active_children()
        _same(SerialBackend(store).run(tasks[:2]), backend.run(tasks[:2]))  # a fresh pool on the next call
    finally:
        backend.close()
    assert not mp.active_children()


def test_procedures_registered_after_the_fork(toy: tuple[ClientStore, list[ClientTask]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable procedure reaches the workers by reference; a closure runs in the driver."""
    store, tasks = toy
    backend = ProcessBackend(store, workers=2)
    try:
        backend.run(tasks[:2])  # forks the workers before the procedures below exist
        workers = set(backend.worker_pids())
        monkeypatch.setitem(CLIENT_PROCEDURES._items, "test_where", _where)
        monkeypatch.setitem(CLIENT_PROCEDURES._items, "test_here", lambda t, d, m: _where(t, d, m))
        for t, kind in zip(tasks, ["test_where", "test_here"] * 3, strict=True):
            t.kind = kind
        got = backend.run(tasks)
    finally:
        backend.close()
    assert [r.client for r in got] == list(range(6))
    assert {r.extras["pid"] for r in got[0::2]} <= workers
    assert {r.extras["pid"] for r in got[1::2]} == {os.getpid()}


def test_auto_picks_the_process_pool_on_a_multicore_cpu(toy: tuple[ClientStore, list[ClientTask]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = toy
    monkeypatch.setattr("fedslim.engine.process_backend.usable_cpus", lambda: 2)
    b = auto_backend(store, device="cpu")
    assert isinstance(b, ProcessBackend) and b.max_workers == 2
    b.close()
    monkeypatch.setattr("fedslim.engine.process_backend.usable_cpus", lambda: 1)
    assert type(auto_backend(store, device="cpu")) is SerialBackend
    monkeypatch.setattr("fedslim.engine.process_backend.usable_cpus", lambda: 8)
    two_threads = SimpleNamespace(engine=SimpleNamespace(threads=2))
    assert type(auto_backend(store, device="cpu", cfg=two_threads)) is SerialBackend  # threads asked for
    monkeypatch.setattr("fedslim.engine.vectorized.fork_available", lambda: False)
    assert type(auto_backend(store, device="cpu")) is SerialBackend


def test_more_than_one_thread_per_worker_is_refused(toy: tuple[ClientStore, list[ClientTask]]) -> None:
    """A forked worker on several OpenMP threads hangs once the parent has run multi-threaded."""
    store, _ = toy
    with pytest.raises(ValueError, match=r"engine\.threads=2"):
        ProcessBackend(store, cfg=SimpleNamespace(engine=SimpleNamespace(threads=2)))


def test_cuda_is_refused_naming_the_setting(toy: tuple[ClientStore, list[ClientTask]]) -> None:
    store, _ = toy
    with pytest.raises(ValueError, match=r"engine\.backend.*vectorized"):
        ProcessBackend(store, device="cuda")


def test_without_fork_it_runs_serially(toy: tuple[ClientStore, list[ClientTask]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store, tasks = toy
    monkeypatch.setattr(process_backend, "fork_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="fork"):
        backend = ProcessBackend(store, workers=2)
    try:
        _same(SerialBackend(store).run(tasks), backend.run(tasks))
        assert backend.num_workers == 0 and not mp.active_children()
    finally:
        backend.close()


def test_a_weight_mask_shared_by_the_round_is_pickled_once(masked_toy_tasks: tuple[ClientStore, list[ClientTask],
                                                                                 dict[str, torch.Tensor]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoFLIP gives every task of a round one mask as large as the weights; it went out inside each
    task's pickle, as much data again per task as the start state sent once."""
    import pickle

    store, tasks, masks = masked_toy_tasks
    expected = SerialBackend(store).run(tasks)
    carried = []
    dumps = pickle.dumps

    def counting(obj: object, *a: object, **kw: object) -> bytes:
        if isinstance(obj, tuple) and any(x is masks or getattr(x, "param_masks", None) is masks for x in obj):
            carried.append(obj)
        return dumps(obj, *a, **kw)

    monkeypatch.setattr(pickle, "dumps", counting)
    backend = ProcessBackend(store, workers=2)
    try:
        got = backend.run(tasks)
    finally:
        backend.close()
    assert len(carried) == 1  # with the start state, once for the 6 tasks
    _same(expected, got)
    for r in got:  # the workers applied the mask: pruned weights end at zero
        for k, m in masks.items():
            assert torch.all((tasks[0].state[k] + r.delta[k])[m == 0] == 0), k
