"""Process backend: a cohort's client tasks spread over long-lived worker processes on this machine.

Workers are forked from the driver when the first round runs and live until ``close()``. Forking is
the point: a worker inherits the client store (the dataset tensors) copy-on-write, so the data is
never pickled or copied, and every client procedure registered in the driver when the workers were
forked is registered in them too. Each worker runs torch on one thread, one worker per core, and
keeps one model buffer per spec, as the serial backend does; per task only the task (start weights
and settings) goes out and the ``ClientResult`` comes back.

One thread per worker is a requirement, not a default: torch's CPU kernels use OpenMP (GNU libgomp in
the PyPI wheels), and a forked child that enters a multi-threaded OpenMP region after its parent has
run one hangs forever (the child inherits the parent's thread-pool bookkeeping but not its threads).
A child on one thread never enters a parallel region. ``engine.threads`` > 1 is therefore refused.

Messages are plain pickles over one pipe per worker. ``multiprocessing``'s own pickler would move
every tensor into a shared-memory segment passed by file descriptor (a segment per tensor per
message, each to be created, sent and released), where a plain copy of a client's weights will do.

Results equal the serial backend's bit for bit when it also runs on one thread (``engine.threads:
1``; on more threads torch may split float32 reductions differently, changing the last bits): the
same procedures run,
each task seeds itself from ``task.seed``, and results are returned in task order so that
aggregation sums in the same order.

One task is in flight per worker, so when a worker dies (``os._exit``, an OOM kill) the backend
knows exactly which task it was running: that task alone is charged a try and sent again to a fresh
worker forked in its place (at most ``max_tries`` tries, then a RuntimeError naming the round and the
client). Results are keyed by the task's position in the cohort and checked against its (round,
client), so no update is lost or counted twice.

Fork and CUDA do not mix (a forked child cannot use the parent's CUDA context), so the backend runs on
CPU only; on a platform without ``fork`` it falls back to the serial backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import signal
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fedslim.engine.backends import ModelBuffers, run_one
from fedslim.engine.schedule import dispatch_order
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask
from fedslim.registry import BACKENDS, CLIENT_PROCEDURES

log = logging.getLogger(__name__)

# Extras a test sets to make the worker running that task die once; see _worker_main.
FAIL_ONCE_EXTRA = "process_exit_once_marker"
_PICKLE = pickle.HIGHEST_PROTOCOL
# How long close() waits for a worker to leave its loop before terminating it.
_JOIN_S = 5.0


def fork_available() -> bool:
    return "fork" in mp.get_all_start_methods()


def _worker_main(conn: Connection, inherited: list[Connection], store: ClientStore, device: str) -> None:
    """Body of one worker: receive (key, task, procedure), run it, send (key, ok, result or error)."""
    # Ctrl-C reaches the whole process group; the driver handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The driver's ends of the other workers' pipes were copied by fork; holding them would keep
    # those workers from seeing end-of-file if the driver died.
    for c in inherited:
        c.close()
    torch.set_num_threads(1)  # never more: see the module docstring (libgomp after fork)
    buffers = ModelBuffers(device, store.channels_last)
    while True:
        try:
            head = conn.recv_bytes()
            state = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the driver closed the pipe or died
        if not head:
            return  # shutdown
        key, task, proc_ref = pickle.loads(head)
        marker = task.extras.get(FAIL_ONCE_EXTRA)
        if marker is not None and not os.path.exists(marker):
            # Fault injection for tests: die like a crashed or OOM-killed worker, once.
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        try:
            task.state, task.param_masks = pickle.loads(state)
            proc = CLIENT_PROCEDURES.get(proc_ref) if isinstance(proc_ref, str) else pickle.loads(proc_ref)
            data = store.get(task.client, task.extras.get("split", "train"))
            out: tuple[int, bool, Any] = (key, True, proc(task, data, buffers.get(task.spec)))
        except Exception as e:  # the procedure's own error: report it, the worker stays usable
            tb = traceback.format_exc()
            try:
                err: bytes | None = pickle.dumps(e, _PICKLE)
            except Exception:  # an unpicklable exception: its text is sent alone
                err = None
            out = (key, False, (err, tb))
        try:
            msg = pickle.dumps(out, _PICKLE)
        except Exception:  # an unpicklable result
            msg = pickle.dumps((key, False, (None, traceback.format_exc())), _PICKLE)
        try:
            conn.send_bytes(msg)
        except OSError:
            return


def _worker_error(payload: tuple[bytes | None, str], t: ClientTask) -> BaseException:
    """The procedure's exception as raised in the worker, with the worker's traceback as a note."""
    err_bytes, tb = payload
    err: BaseException | None = None
    if err_bytes is not None:
        with contextlib.suppress(Exception):  # an exception class that cannot be rebuilt from its args
            err = pickle.loads(err_bytes)
    if err is None:
        return RuntimeError(f"process backend: client {t.client} of round {t.round} failed in its worker:\n{tb}")
    err.add_note(f"(in a process-backend worker, client {t.client} of round {t.round})\n{tb}")
    return err


class _Worker:
    def __init__(self, proc: mp.process.BaseProcess, conn: Connection):
        self.proc, self.conn = proc, conn
        self.task: int | None = None  # key of the task it is running


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@BACKENDS.register("process", "long-lived worker processes on this machine (fork), one torch thread each")
class ProcessBackend:
    def __init__(self, store: ClientStore, device: str = "cpu", cfg: Any = None, *, workers: int | None = None,
                 max_tries: int = 3, **_: object):
        if str(device).startswith("cuda"):
            raise ValueError("engine.backend 'process' runs on the CPU only: forked workers cannot use CUDA; "
                             "use engine.backend: vectorized (or serial, or auto) on a GPU")
        eng = getattr(cfg, "engine", None)
        self.store = store
        self.device = str(device)
        threads = getattr(eng, "threads", None) or 1
        if threads > 1:
            raise ValueError(f"engine.backend 'process' runs one torch thread per worker; engine.threads={threads} "
                             "would hang its forked workers (OpenMP after fork): leave engine.threads unset or 1, "
                             "or use engine.backend: serial")
        self.max_workers = workers or usable_cpus()
        self.max_tries = max_tries
        self.dispatch = getattr(eng, "dispatch", "longest_first")
        self.last_dispatch: list[int] = []  # positions of the last cohort's tasks in the order they were sent
        self.retries = 0  # tasks re-sent after a worker died (for reports and tests)
        self._workers: list[_Worker] = []
        self._forked_procs: dict[str, Callable[..., ClientResult]] = {}  # registry as the workers have it
        # Model buffers of the tasks run here (procedures the workers cannot reach), as serial has them.
        self.buffers = ModelBuffers(self.device, store.channels_last)
        self._serial_only = not fork_available()
        if self._serial_only:
            warnings.warn("engine.backend 'process' needs the fork start method, which this platform lacks; "
                          "running the clients serially", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ workers
    def _ensure_workers(self, n: int) -> None:
        """Fork workers up to n (never more than max_workers); existing ones are kept across rounds."""
        n = min(n, self.max_workers)
        if not self._workers:
            self._forked_procs = {name: CLIENT_PROCEDURES.get(name) for name in CLIENT_PROCEDURES}
        while len(self._workers) < n:
            self._workers.append(self._fork())

    def _fork(self) -> _Worker:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=True)
        inherited = [w.conn for w in self._workers] + [parent]
        # With fork the arguments are inherited, not pickled: the store is shared copy-on-write.
        proc = ctx.Process(target=_worker_main, args=(child, inherited, self.store, self.device),
                           name="fedslim-process-worker", daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, w: _Worker, graceful: bool) -> None:
        if graceful and w.proc.is_alive():
            with contextlib.suppress(OSError):
                w.conn.send_bytes(b"")
                w.conn.send_bytes(b"")
            w.proc.join(_JOIN_S)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        w.proc.close()

    def _shutdown(self, graceful: bool) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            self._stop(w, graceful)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    # ------------------------------------------------------------------ tasks
    def _proc_ref(self, kind: str) -> str | bytes | None:
        """How a worker finds the task's procedure: by name when the forked registry holds the same
        function, by pickled reference when it is importable, else None (run it in the driver)."""
        proc = CLIENT_PROCEDURES.get(kind)
        if self._forked_procs.get(kind) is proc:
            return kind
        try:
            return pickle.dumps(proc, _PICKLE)
        except Exception:  # a closure or lambda registered after the fork
            return None

    def _run_here(self, task: ClientTask) -> ClientResult:
        return run_one(task, self.store, self.buffers)

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        if not tasks:
            return []
        if self._serial_only:
            return [self._run_here(t) for t in tasks]
        self._ensure_workers(len(tasks))
        try:
            return self._run(tasks)
        except BaseException:
            # Other workers may still be busy with this round; their late answers must not reach
            # the next one. Fresh workers are forked when run() is called again.
            self._shutdown(graceful=False)
            raise

    def _run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        refs = {t.kind: self._proc_ref(t.kind) for t in tasks}
        here = [k for k, t in enumerate(tasks) if refs[t.kind] is None]
        pending = deque(k for k in dispatch_order(tasks, self.store, self.dispatch)
                        if refs[tasks[k].kind] is not None)
        self.last_dispatch = []
        # One pickle per distinct start state and weight mask (FedAvg: one per round; a mask as large as the
        # weights, AutoFLIP's, is shared by every task of a round and would cost as much again per task).
        states: dict[tuple[int, int], bytes] = {}
        attempts = [0] * len(tasks)
        results: dict[int, ClientResult] = {}

        def send(w: _Worker, k: int) -> None:
            t = tasks[k]
            sk = (id(t.state), id(t.param_masks))
            if sk not in states:
                states[sk] = pickle.dumps((t.state, t.param_masks), _PICKLE)
            # The downlink codec already ran in the driver; it need not (and may not) pickle.
            shipped = dataclasses.replace(t, state={}, param_masks=None, down_codec=None)
            w.task = k
            self.last_dispatch.append(k)
            w.conn.send_bytes(pickle.dumps((k, shipped, refs[t.kind]), _PICKLE))
            w.conn.send_bytes(states[sk])

        def died(i: int, k: int) -> None:
            w = self._workers[i]
            w.proc.join(1.0)
            code = w.proc.exitcode
            t = tasks[k]
            attempts[k] += 1
            how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
            if attempts[k] >= self.max_tries:
                raise RuntimeError(f"process backend: client {t.client} of round {t.round} failed {attempts[k]} "
                                   f"times because its worker process died (last: {how}; signal 9 is often the "
                                   f"out-of-memory killer)")
            self.retries += 1
            log.warning("process worker died (%s) running client %d of round %d; retrying on a new worker",
                        how, t.client, t.round)
            self._stop(w, graceful=False)
            self._workers[i] = self._fork()
            pending.appendleft(k)

        while pending or any(w.task is not None for w in self._workers):
            for i, w in enumerate(self._workers):
                if w.task is None and pending:
                    k = pending.popleft()
                    try:
                        send(w, k)
                    except OSError:  # died while idle
                        died(i, k)
            busy = [(i, w) for i, w in enumerate(self._workers) if w.task is not None]
            if not busy:  # the only worker died before taking its task; its replacement takes it now
                continue
            ready = set(wait([w.conn for _, w in busy] + [w.proc.sentinel for _, w in busy]))
            for i, w in busy:
                k = w.task
                assert k is not None
                # A result written just before dying is still read: check the pipe before the exit.
                if w.conn in ready or w.conn.poll():
                    try:
                        key, ok, payload = pickle.loads(w.conn.recv_bytes())
                    except (EOFError, OSError):
                        died(i, k)
                        continue
                elif w.proc.sentinel in ready:
                    died(i, k)
                    continue
                else:
                    continue
                w.task = None
                t = tasks[k]
                if not ok:
                    raise _worker_error(payload, t)
                if key != k or (payload.round, payload.client) != (t.round, t.client):
                    raise RuntimeError(f"process backend: result for (round {payload.round}, client "
                                       f"{payload.client}) came back for task (round {t.round}, client {t.client})")
                results.setdefault(k, payload)
        for k in here:
            results[k] = self._run_here(tasks[k])
        return [results[k] for k in range(len(tasks))]

    def close(self) -> None:
        self._shutdown(graceful=True)
