"""Ray backend: a cohort's client tasks spread over long-lived actors on a Ray cluster.

Each actor is built once per run with the client data and keeps one model buffer per spec (as the
serial backend does), so a task carries only its start weights and settings. The data goes into
Ray's object store once (``ray.put``) rather than being re-loaded by each actor from the config:
workers on other machines need not hold the dataset files, and a dataset an algorithm derived in the
driver (a partition, a local test split, a subset) reaches them exactly as the driver sees it. The
arrays travel as NumPy so that actors on one node read the same shared-memory copy (zero-copy);
tensors would be unpickled into a private copy per actor.

Results equal the serial backend's bit for bit for the same seed: the same client procedures run
with torch on the configured number of threads (one by default), each task seeds itself from
``task.seed``, and results come back in task order so that aggregation sums in the same order.

A worker that dies mid-round (its process killed, its node lost) is replaced by a fresh actor and
its unfinished tasks are sent again. Results are keyed by the task's position in the cohort and
checked against its (round, client), so a retried update is counted once and never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections import deque
from typing import Any

import numpy as np
import torch

from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.schedule import dispatch_order
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask
from fedslim.registry import BACKENDS, CLIENT_PROCEDURES

log = logging.getLogger(__name__)

INSTALL_HINT = "engine.backend 'ray' needs Ray: pip install 'fedslim[ray]' (or pip install 'ray>=2.9')"
# Tasks sent to one actor at a time. A second one queued behind the running one would hide the round
# trip to the driver, but it commits the task to that actor: longest first, it can be a long task
# stuck behind another long one while other actors are free. bench/dispatch.py's model of 25 LeNet
# clients of a Dirichlet split: rounds 1.28x their lower bound with two per actor on 8 actors (alpha
# 0.1) and 1.50x on 16 (alpha 1), against 1.03x and 1.06x with one. The round trip did not show on a
# local cluster: bench/compare.py's fedslim-ray took 0.325 and 0.336 s per LeNet update with two,
# 0.334 and 0.328 with one.
IN_FLIGHT_PER_WORKER = 1
# Extras a test sets to make a worker die; see RayWorker.run.
FAIL_ONCE_EXTRA = "ray_exit_once_marker"


class MissingExtraError(ImportError):
    """An optional dependency a chosen setting needs is not installed; the message says how to install
    it (the command line prints it as one line, not a traceback)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError(INSTALL_HINT) from e
    return ray


def _store_payload(store: ClientStore) -> dict[str, Any]:
    """What a worker needs to rebuild the store: training arrays and index lists, no test set."""
    b = store.bundle
    return {
        "name": b.name, "num_classes": b.num_classes, "input_shape": tuple(b.input_shape),
        "x": b.train.x.detach().cpu().numpy(), "y": b.train.y.detach().cpu().numpy(),
        "train_parts": [p.cpu().numpy() for p in store.train_parts],
        "test_parts": None if store.test_parts is None else [p.cpu().numpy() for p in store.test_parts],
        "channels_last": store.channels_last,
    }


def _store_from_payload(p: dict[str, Any], device: str) -> ClientStore:
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the store only ever indexes (copies) them.
        warnings.simplefilter("ignore", UserWarning)
        x, y = torch.from_numpy(p["x"]), torch.from_numpy(p["y"])
    empty = TensorData(x[:0], y[:0])
    bundle = DatasetBundle(p["name"], TensorData(x, y), empty, p["num_classes"], p["input_shape"])
    parts = [torch.from_numpy(np.array(a)) for a in p["train_parts"]]
    tests = None if p["test_parts"] is None else [torch.from_numpy(np.array(a)) for a in p["test_parts"]]
    return ClientStore(bundle, parts, tests, device=device, channels_last=bool(p.get("channels_last", False)))


class RayWorker:
    """Body of one Ray actor: the client data, model buffers, and a loop-free ``run``."""

    def __init__(self, payload: dict[str, Any], device: str, threads: int, malloc: bool = False,
                 plugin_specs: tuple[str, ...] = ()):
        torch.set_num_threads(threads)
        from fedslim import plugins

        # The config's plugins too: the procedures they register reach this process by reference.
        plugins.load_plugins(list(plugin_specs))
        from fedslim.engine.backends import ModelBuffers
        from fedslim.engine.host import tune_malloc, warm_up_optimizers

        if malloc:
            tune_malloc()
        warm_up_optimizers()
        self.store = _store_from_payload(payload, device)
        self.buffers = ModelBuffers(device, self.store.channels_last)

    def pid(self) -> int:
        return os.getpid()

    def run(self, key: int, task: ClientTask, start: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None],
            proc: Any) -> tuple[int, ClientResult]:
        marker = task.extras.get(FAIL_ONCE_EXTRA)
        if marker is not None and not os.path.exists(marker):
            # Fault injection for tests: die like a crashed or preempted worker, once.
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        task.state, task.param_masks = start
        data = self.store.get(task.client, task.extras.get("split", "train"))
        return key, proc(task, data, self.buffers.get(task.spec))


def _run_error(message: str) -> Exception:
    from fedslim.engine.run import RunError  # run imports the backends

    return RunError(message)


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an ``engine.ray_address`` that is malformed or where nothing listens, in seconds: Ray's
    own ``init`` retries an unreachable address for minutes. ``auto`` (the cluster this machine
    joined) is left to ``ray.init``."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise _run_error(f"engine.ray_address: {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise _run_error(f"engine.ray_address: nothing answers at {host}:{port} ({e.strerror or e}); start a "
                         f"cluster there (ray start --head --port {port}), or leave engine.ray_address unset "
                         f"for a local one") from None


def _shippable(task: ClientTask) -> ClientTask:
    """The task without its state and weight mask (sent once per round as an object ref) and codec
    (driver-side)."""
    extras = {k: v for k, v in task.extras.items()}
    return ClientTask(task.client, task.round, task.spec, {}, task.train, task.kind, task.seed, task.label_mask,
                      None, None, extras)


@BACKENDS.register("ray", "a Ray cluster (engine.ray_address; a local one by default), long-lived workers")
class RayBackend:
    def __init__(self, store: ClientStore, device: str = "cpu", cfg: Any = None, *, address: str | None = None,
                 workers: int | None = None, threads: int | None = None, max_retries: int = 3, **_: object):
        self.ray = ray = import_ray()
        eng = getattr(cfg, "engine", None)
        address = address if address is not None else getattr(eng, "ray_address", None)
        workers = workers if workers is not None else getattr(eng, "ray_workers", None)
        self.threads = threads or getattr(eng, "threads", None) or 1
        self.malloc = bool(getattr(eng, "tune_malloc", False))
        self.device = device
        self.max_retries = max_retries
        self.store = store
        self.dispatch = getattr(eng, "dispatch", "longest_first")
        self.last_dispatch: list[int] = []  # positions of the last cohort's tasks in the order they were sent
        self.last_workers: dict[int, int] = {}  # task position -> the worker slot whose result was kept
        self.retries = 0  # tasks re-sent after a worker died (for reports and tests)
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                # A local cluster on the loopback address; it dies with this process. Ray announces on
                # every start that the cluster uses token authentication (its default); for a private
                # cluster that lives as long as the run, that line is noise.
                token_note = logging.getLogger("ray._private.authentication.authentication_token_setup")
                level = token_note.level
                token_note.setLevel(logging.ERROR)
                try:
                    ray.init(address="local", include_dashboard=False, log_to_driver=False,
                             _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
                finally:
                    token_note.setLevel(level)
            else:
                check_address(address)
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, ValueError, RuntimeError) as e:
                    raise _run_error(f"engine.ray_address: no Ray cluster at {address!r} "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._owns_ray = True
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 0))
        if workers is None:
            workers = max(1, cpus // self.threads)
        # Actors the cluster cannot place would wait for CPUs forever, and the round with them.
        if workers * self.threads > cpus:
            self._give_up_ray()
            raise _run_error(f"engine.ray_workers={workers} x engine.threads={self.threads} needs "
                             f"{workers * self.threads} CPUs, and the Ray cluster has {cpus}; lower either one "
                             f"(unset, ray_workers fills the cluster)")
        opts: dict[str, Any] = {"num_cpus": self.threads}
        if device.startswith("cuda"):
            if resources.get("GPU", 0) <= 0:
                self._give_up_ray()
                raise _run_error("engine.device: cuda, but the Ray cluster has no GPU; use engine.device=cpu "
                                 "or a cluster started with GPUs")
            opts["num_gpus"] = 1 / workers
        self._actor_cls = ray.remote(**opts)(RayWorker)
        self._plugin_specs = tuple(getattr(cfg, "plugins", None) or ())
        self._payload = ray.put(_store_payload(store))
        self._workers = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> Any:
        return self._actor_cls.remote(self._payload, self.device, self.threads, self.malloc, self._plugin_specs)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def worker_pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self._workers])

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        ray = self.ray
        if not tasks:
            return []
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        dead_errors = (RayActorError, ActorDiedError, ActorUnavailableError)
        # One object per distinct start state and weight mask: FedAvg's 25 tasks share one, HeteroFL's one
        # per width; AutoFLIP's mask, as large as the weights, travels once too.
        refs: dict[tuple[int, int], Any] = {}
        for t in tasks:
            if (id(t.state), id(t.param_masks)) not in refs:
                refs[(id(t.state), id(t.param_masks))] = ray.put((t.state, t.param_masks))
        procs = {t.kind: CLIENT_PROCEDURES.get(t.kind) for t in tasks}
        pending = deque(dispatch_order(tasks, self.store, self.dispatch))
        self.last_dispatch = []
        self.last_workers = {}
        attempts = [0] * len(tasks)
        results: dict[int, ClientResult] = {}
        running: dict[Any, tuple[int, int, Any]] = {}  # future -> (task key, worker slot, actor)
        load = [0] * len(self._workers)

        def submit(slot: int) -> None:
            while pending and load[slot] < IN_FLIGHT_PER_WORKER:
                k = pending.popleft()
                t = tasks[k]
                actor = self._workers[slot]
                fut = actor.run.remote(k, _shippable(t), refs[(id(t.state), id(t.param_masks))], procs[t.kind])
                self.last_dispatch.append(k)
                running[fut] = (k, slot, actor)
                load[slot] += 1

        for s in range(len(self._workers)):
            submit(s)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            fut = done[0]
            k, slot, actor = running.pop(fut)
            load[slot] -= 1
            try:
                key, res = ray.get(fut)
            except dead_errors as e:
                attempts[k] += 1
                if attempts[k] > self.max_retries:
                    raise RuntimeError(f"ray backend: client {tasks[k].client} of round {tasks[k].round} failed "
                                       f"{attempts[k]} times because its worker died: {e}") from e
                self.retries += 1
                log.warning("ray worker died running client %d of round %d; retrying on a new worker",
                            tasks[k].client, tasks[k].round)
                pending.appendleft(k)
                if self._workers[slot] is actor:  # its other in-flight tasks fail too; replace it once
                    self._replace(slot)
                submit(slot)
                continue
            except RayTaskError as e:
                # The client procedure raised: re-raise what it raised, as serial and process do, not
                # Ray's wrapper (an actor header with colour codes and a remote traceback in the message).
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
                    raise cause from None
                raise
            t = tasks[k]
            if key != k or (res.round, res.client) != (t.round, t.client):
                raise RuntimeError(f"ray backend: result for (round {res.round}, client {res.client}) came back "
                                   f"for task (round {t.round}, client {t.client})")
            # A re-executed task (Ray may run one twice around a failure) yields the same pure result.
            if k not in results:
                results[k] = res
                self.last_workers[k] = slot
            submit(slot)
        return [results[k] for k in range(len(tasks))]

    def _replace(self, slot: int) -> None:
        """Swap in a fresh actor for a dead one (its other futures fail and are re-sent as they surface)."""
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(self._workers[slot], no_restart=True)
        self._workers[slot] = self._spawn()

    def _give_up_ray(self) -> None:
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._owns_ray = False

    def close(self) -> None:
        ray = self.ray
        for w in self._workers:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(w, no_restart=True)
        self._workers = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
