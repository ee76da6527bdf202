"""bench/dispatch.py's round simulation (workers take the next task when free) and its option checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
dispatch = pytest.importorskip("dispatch")


def test_makespan_is_the_busiest_worker_under_greedy_assignment() -> None:
    assert dispatch.makespan([1.0, 1.0, 1.0, 1.0], 2) == 2.0
    assert dispatch.makespan([1.0, 1.0, 4.0], 2) == 5.0  # the long task starts last: 1 + 4
    assert dispatch.makespan([4.0, 1.0, 1.0], 2) == 4.0  # longest first: 4 | 1 + 1
    assert dispatch.makespan([2.0, 3.0], 4) == 3.0  # more workers than tasks
    assert dispatch.makespan([5.0], 1) == 5.0


def test_queued_dispatch_strands_a_task_unless_an_idle_worker_takes_it() -> None:
    # Two per worker: 4 and 1 on the first, 1 and 1 on the second, which is done at t=2.
    assert dispatch.queued_makespan([4.0, 1.0, 1.0, 1.0], 2, steal=False) == 5.0  # the 1 waits behind the 4
    assert dispatch.queued_makespan([4.0, 1.0, 1.0, 1.0], 2, steal=True) == 4.0  # taken over at t=2
    assert dispatch.queued_makespan([1.0] * 4, 2, steal=False) == 2.0
    assert dispatch.queued_makespan([3.0, 1.0], 4) == 3.0  # more workers than tasks
    # One task per worker at a time is plain greedy assignment.
    for costs in ([5.0, 1.0, 2.0, 2.0, 1.0], [1.0, 1.0, 4.0], [2.0, 7.0, 1.0, 3.0, 3.0, 1.0]):
        assert dispatch.queued_makespan(costs, 2, depth=1) == dispatch.makespan(costs, 2)


def test_bad_options_name_the_flag() -> None:
    for args, flag in ((["--rounds", "0"], "--rounds"), (["--workers", "0"], "--workers")):
        out = subprocess.run([sys.executable, str(BENCH / "dispatch.py"), *args], capture_output=True, text=True)
        assert out.returncode == 2 and flag in out.stderr
