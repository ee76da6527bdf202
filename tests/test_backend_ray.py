"""The Ray backend against a real local Ray cluster (127.0.0.1, 2 CPUs): same numbers as serial, a
worker killed mid-round is retried without losing or double-counting an update."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedslim.algorithms.fedavg import FedAvg
from fedslim.config import validate
from fedslim.engine.backends import SerialBackend
from fedslim.engine.ray_backend import FAIL_ONCE_EXTRA, RayBackend, import_ray
from fedslim.engine.run import Runner
from fedslim.engine.task import ClientTask
from fedslim.results import read_jsonl


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def _run(cfg: dict) -> list[dict]:
    runner = Runner(validate(cfg), out=open(os.devnull, "w"))  # noqa: SIM115
    runner.run()
    return read_jsonl(runner.run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def serial_rows(tmp_path_factory: pytest.TempPathFactory, lenet_backend_cfg: Callable[..., dict]) -> list[dict]:
    return _run(lenet_backend_cfg(tmp_path_factory.mktemp("serial"), "serial", "s"))


@pytest.mark.ray
def test_ray_run_equals_serial_run(ray_cluster: object, serial_rows: list[dict], tmp_path: Path,
                                   lenet_backend_cfg: Callable[..., dict]) -> None:
    ray_rows = _run(lenet_backend_cfg(tmp_path, "ray", "r"))
    assert ray_rows == serial_rows  # losses, accuracies, byte counts: bit for bit


@pytest.mark.ray
def test_a_plugin_files_procedure_runs_on_ray_workers(ray_cluster: object, serial_rows: list[dict], tmp_path: Path,
                                                      lenet_backend_cfg: Callable[..., dict]) -> None:
    # FedProx at mu 0 is FedAvg, through its own client procedure, which the workers only know by
    # loading the config's plugin file themselves.
    cfg = lenet_backend_cfg(tmp_path, "ray", "prox")
    cfg |= {"plugins": [str(Path(__file__).resolve().parent.parent / "examples" / "plugins" / "fedprox.py")],
            "algorithm": {"name": "fedprox", "params": {"mu": 0.0}}}
    assert _run(cfg) == serial_rows


@pytest.mark.ray
def test_worker_killed_mid_round_is_retried(ray_cluster: object, serial_rows: list[dict], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            lenet_backend_cfg: Callable[..., dict]) -> None:
    marker = tmp_path / "worker-died"
    plan = FedAvg.plan

    def plan_with_a_crash(self: FedAvg, round_: int, cohort: list[int]) -> list[ClientTask]:
        tasks = plan(self, round_, cohort)
        if round_ == 2:  # the worker holding this task dies during the round
            tasks[1].extras[FAIL_ONCE_EXTRA] = str(marker)
        return tasks

    monkeypatch.setattr(FedAvg, "plan", plan_with_a_crash)
    crashed = _run(lenet_backend_cfg(tmp_path, "ray", "r"))
    assert marker.exists(), "the fault was not injected"
    assert crashed == serial_rows  # every update of round 2 counted once, none lost


def assert_same_results(expected: list[Any], got: list[Any]) -> None:
    """The same clients in the same order, with the same losses, step counts and deltas bit for bit."""
    assert [r.client for r in got] == [r.client for r in expected]
    for a, b in zip(expected, got, strict=True):
        assert a.loss == b.loss and a.num_steps == b.num_steps
        assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def run_on_two_workers(store: Any, tasks: list[ClientTask],
                       warm_up: list[ClientTask] | None = None) -> tuple[RayBackend, list[Any]]:
    backend = RayBackend(store, workers=2)
    try:
        if warm_up:
            backend.run(warm_up)
        return backend, backend.run(tasks)
    finally:
        backend.close()


@pytest.mark.ray
def test_backend_retries_on_a_fresh_worker(ray_cluster: object, tmp_path: Path,
                                           toy_tasks: tuple[Any, list[ClientTask]]) -> None:
    store, tasks = toy_tasks
    expected = SerialBackend(store).run(tasks)
    tasks[4].extras[FAIL_ONCE_EXTRA] = str(tmp_path / "died")
    backend = RayBackend(store, workers=2)
    try:
        before = set(backend.worker_pids())
        got = backend.run(tasks)
        after = set(backend.worker_pids())
    finally:
        backend.close()
    dead = int((tmp_path / "died").read_text())
    assert dead in before and dead not in after and len(after) == 2
    assert backend.retries >= 1
    assert [r.client for r in got] == list(range(6))
    assert_same_results(expected, got)


@pytest.mark.ray
def test_longest_tasks_go_out_first_and_results_stay_in_task_order(
        ray_cluster: object, uneven_tasks: tuple[Any, list[ClientTask]]) -> None:
    store, tasks = uneven_tasks
    expected = SerialBackend(store).run(tasks)
    backend, got = run_on_two_workers(store, tasks)
    assert backend.last_dispatch == [1, 5, 3, 4, 0, 2]
    assert [r.client for r in got] == list(range(6))
    assert_same_results(expected, got)


@pytest.mark.ray
def test_short_tasks_do_not_wait_behind_a_long_one(
        ray_cluster: object, one_long_task: tuple[Any, list[ClientTask]]) -> None:
    store, tasks = one_long_task
    expected = SerialBackend(store).run(tasks)
    # Both workers warmed up first (actors started, model buffers built): on a loaded machine a
    # worker that is still starting could let the long client finish first, and this test is about
    # the dispatch, not about start-up.
    backend, got = run_on_two_workers(store, tasks, warm_up=tasks[1:])
    # One task per worker at a time: the long client 0 keeps one worker, the other takes 1, 2 and 3
    # as it frees (a second task sent to client 0's worker would wait for it).
    assert backend.last_dispatch == [0, 1, 2, 3]
    long_slot = backend.last_workers[0]
    assert {backend.last_workers[k] for k in (1, 2, 3)} == {1 - long_slot}
    assert [r.client for r in got] == [0, 1, 2, 3]
    assert_same_results(expected, got)


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'fedslim\[ray\]'"):
        import_ray()


@pytest.mark.ray
@pytest.mark.parametrize("workers,threads", [(3, 1), (None, 4)])
def test_workers_the_cluster_cannot_place_are_refused_not_waited_for(
        ray_cluster: object, toy_tasks: tuple[Any, list[ClientTask]], workers: int | None, threads: int) -> None:
    from fedslim.engine.run import RunError

    store, _ = toy_tasks
    with pytest.raises(RunError, match=r"engine.ray_workers=\d+ x engine.threads=\d+ needs \d+ CPUs, and the "
                                       r"Ray cluster has 2"):
        RayBackend(store, workers=workers, threads=threads)


def test_an_address_where_nothing_listens_is_refused_in_seconds() -> None:
    import socket
    import time

    from fedslim.engine.ray_backend import check_address
    from fedslim.engine.run import RunError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    t = time.perf_counter()
    with pytest.raises(RunError, match=f"engine.ray_address: nothing answers at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}")
    assert time.perf_counter() - t < 5
    for bad in ("nonsense", "host:", ":6379", "ray://host:port"):
        with pytest.raises(RunError, match="is not host:port"):
            check_address(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_address(f"127.0.0.1:{s.getsockname()[1]}")  # something answers: left to ray.init


@pytest.mark.ray
def test_a_weight_mask_shared_by_the_round_goes_out_once(ray_cluster: Any, masked_toy_tasks: tuple[Any, list[Any], Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoFLIP's mask, as large as the weights and the same for every task of a round, went out inside
    every task; now it travels with the start state, one object for the round."""
    store, tasks, masks = masked_toy_tasks
    expected = SerialBackend(store).run(tasks)
    put, carried = ray_cluster.put, []

    def counting(obj: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(obj, tuple) and any(x is masks for x in obj):
            carried.append(obj)
        return put(obj, *a, **kw)

    monkeypatch.setattr(ray_cluster, "put", counting)
    _, got = run_on_two_workers(store, tasks)
    assert len(carried) == 1
    assert_same_results(expected, got)
