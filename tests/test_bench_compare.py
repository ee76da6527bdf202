"""bench/compare.py's arithmetic: the headline leaves the first round out, repeats reduce to medians,
and goals compare seconds per update."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
compare = pytest.importorskip("compare")


def _run(contender: str, rounds: list[float], per_round: int = 25, **extra: object) -> dict:
    return {"workload": "lenet", "contender": contender, "round_s": rounds, "updates": per_round * len(rounds),
            "startup_s": 3.0, "acc_round1": 0.9, "threads": 1, "peak_mb": 100.0, **extra}


def test_steady_state_leaves_out_the_first_round() -> None:
    assert compare.steady(_run("x", [30.0, 10.0, 12.0])) == (50, 22.0)
    assert compare.steady(_run("x", [30.0])) == (25, 30.0)  # one round: nothing to leave out


def test_repeats_reduce_to_the_median_and_goals_use_it() -> None:
    runs = [_run("fedslim-process", [20.0, 10.0]), _run("fedslim-process", [20.0, 12.5]),
            _run("fedslim-process", [20.0, 30.0]), _run("flower", [40.0, 25.0]),
            {"workload": "lenet", "contender": "pfl", "error": "exit 1: boom"}]
    rows = {r["contender"]: r for r in compare.summarize(runs)}
    proc = rows["fedslim-process"]
    assert proc["s_per_update"] == pytest.approx(12.5 / 25)
    assert proc["first_s_per_update"] == pytest.approx(20.0 / 25)
    assert proc["spread"] == pytest.approx((30.0 - 10.0) / 12.5)
    assert "s_per_update" not in rows["pfl"] and rows["pfl"]["errors"] == ["exit 1: boom"]
    assert "pfl" in compare.fmt_table(list(rows.values())) and "not run: exit 1: boom" in compare.fmt_table(
        list(rows.values()))
    lines = compare.goals(list(rows.values()))
    assert "lenet: fedslim-process (default: auto = process on CPU) runs 2.00x as fast as flower " \
           "(goal >= 2.5x): NOT met" in lines


def test_gpu_goal_compares_vectorized_with_serial_and_says_where_it_ran() -> None:
    rows = compare.summarize([_run("fedslim-serial", [9.0, 5.0]), _run("fedslim-vectorized", [3.0, 0.4])])
    on_gpu = compare.goals(rows, "cuda")
    assert "lenet on cuda: fedslim-vectorized runs 12.50x as fast as fedslim-serial (goal >= 10x on a GPU): met" \
        in on_gpu
    slow = compare.summarize([_run("fedslim-serial", [9.0, 5.0]), _run("fedslim-vectorized", [3.0, 1.0])])
    assert any(g.endswith("5.00x as fast as fedslim-serial (goal >= 10x on a GPU): NOT met")
               for g in compare.goals(slow, "cuda"))
    on_cpu = compare.goals(rows, "cpu")
    assert any("on cpu" in g and g.endswith("the goal is for a GPU; this run is on the CPU") for g in on_cpu)


def test_accuracy_check_falls_back_to_the_process_backend_and_flower_defaults_has_a_goal() -> None:
    rows = compare.summarize([_run("fedslim-process", [20.0, 10.0]),
                              _run("flower-defaults", [40.0, 30.0], acc_round1=0.8)])
    lines = compare.goals(rows)
    assert "lenet: round-1 accuracy flower-defaults 80.00 vs fedslim-process 90.00 (diff 10.00 points)" in lines
    assert not any("accuracy fedslim-process" in g for g in lines)  # the reference is not compared to itself
    assert any(g.startswith("lenet: fedslim-process") and "3.00x as fast as flower-defaults" in g for g in lines)


def test_memory_sampling_interval_must_be_positive() -> None:
    import subprocess

    script = Path(compare.__file__)
    out = subprocess.run([sys.executable, str(script), "--sample-every", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "--sample-every: must be a positive number of seconds (got 0.0)" in out.stderr


@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_only_torch_says_how_to_get_a_cuda_build() -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(Path(compare.__file__)), "--device", "cuda", "--workloads", "lenet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "CPU-only build" in out.stderr and "pip install --force-reinstall torch==2.13.0" in out.stderr


def test_gpu_memory_gets_a_column_only_when_a_contender_reports_it() -> None:
    cpu_only = compare.summarize([_run("fedslim-serial", [20.0, 10.0]), _run("floor", [30.0, 20.0])])
    assert "GPU MB" not in compare.fmt_table(cpu_only)
    runs = [_run("fedslim-serial", [20.0, 10.0], gpu_peak_mb=40.0),
            _run("fedslim-serial", [20.0, 11.0], gpu_peak_mb=48.4), _run("floor", [30.0, 20.0])]
    rows = compare.summarize(runs)
    assert {r["contender"]: r.get("gpu_peak_mb") for r in rows} == {"fedslim-serial": 48.4, "floor": None}
    table = compare.fmt_table(rows).splitlines()
    assert table[0].split()[-2:] == ["GPU", "MB"]
    by_name = {ln.split()[1]: ln.split() for ln in table[2:]}
    assert by_name["fedslim-serial"][-1] == "48" and by_name["floor"][-1] == "-"


@pytest.mark.parametrize("argv,expected", [
    (["--contenders", "flwr"], "argument --contenders: invalid choice: 'flwr'"),
    (["--rounds", "0"], "--rounds: must be at least 1 (got 0)"),
    (["--repeat", "0"], "--repeat: must be at least 1 (got 0)"),
    (["--data-dir", "/nonexistent/fedslim-data"], "--data-dir /nonexistent/fedslim-data: dataset 'mnist' not found"),
])
def test_bad_options_stop_before_any_contender_runs(argv: list[str], expected: str) -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(Path(compare.__file__)), *argv], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "== " not in out.stdout  # no workload started
