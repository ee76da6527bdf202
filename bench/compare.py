"""fedslim's backends against Flower's simulation engine, pfl and a centralized floor, in one run.

    python bench/compare.py [--data-dir DIR] [--workloads lenet heterofl] [--contenders ...] [--json FILE]

Each contender runs in its own process (bench/contender.py) on the same workload; this script samples
the memory of that process and all of its descendants (Ray's raylet, object store and workers
included) and prints one table. Memory is the peak of the summed PSS (proportional set size: a page
shared by k processes counts 1/k in each), so Ray's shared object store is not counted once per
worker. Reading a process's PSS walks its page tables (about 9 ms for one torch process here), and the
sampler's thread competes with contenders that keep every core busy, more with those that have more
processes (Ray's): ``--sample-every`` (seconds, default 1) sets the interval, and ``sampler_cpu_s`` in
the JSON is the CPU time the sampling took per contender run (see bench/README.md). The machine should
be otherwise idle: contenders run one after another, and a busy machine slows them unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import DEFAULT_DATA, WORKLOADS  # noqa: E402

CONTENDERS = ["floor", "fedslim-serial", "fedslim-serial-1t", "fedslim-process", "fedslim-vectorized", "fedslim-ray",
              "flower", "flower-defaults", "pfl"]
# What fedslim's default engine.backend (auto) runs on a multi-core CPU without a GPU.
DEFAULT_CPU = "fedslim-process"
# Pairs that are not run, and why (printed in the table instead of a number).
NOT_RUN = {
    ("heterofl", "flower"): "no HeteroFL in Flower (its strategies send one model to every client)",
    ("heterofl", "flower-defaults"): "no HeteroFL in Flower",
    ("heterofl", "pfl"): "no HeteroFL in pfl (one PyTorchModel shared by every user)",
}
# Not run with --device cuda, and why.
CPU_ONLY = {"flower": "CPU only in this benchmark's peer script", "pfl": "CPU only in this benchmark's peer script",
            "flower-defaults": "CPU only in this benchmark's peer script",
            "fedslim-process": "CPU only (forked workers cannot use CUDA)"}
# The GPU goal: on CUDA, vectorized cohorts at least this many times as fast as serial.
GPU_GOAL = 10.0
TIMEOUT_S = 600


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    kids = _children()
    total, todo, seen = 0, [root], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _pss_kb(p)
        todo.extend(kids.get(p, []))
    return total / 1024


def run_contender(name: str, workload: str, data_dir: str, rounds: int | None,
                  device: str = "cpu", sample_every: float = 1.0) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "contender.py"), name, workload, "--data-dir", data_dir, "--device", device]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    peak = [0.0]
    sampler_cpu = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            sampler_cpu[0] = time.thread_time()
            stop.wait(sample_every)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the contender's own process group: its Ray cluster too
        out, _ = proc.communicate()
        out += f"\ntimed out after {TIMEOUT_S} s"
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(ln for ln in out.strip().splitlines()[-3:])
        return {"contender": name, "workload": workload, "error": f"exit {proc.returncode}: {tail[-300:]}",
                "wall_s": wall, "peak_mb": peak[0], "sampler_cpu_s": round(sampler_cpu[0], 3)}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update({"wall_s": wall, "peak_mb": peak[0], "sampler_cpu_s": round(sampler_cpu[0], 3)})
    return res


def steady(r: dict[str, Any]) -> tuple[int, float]:
    """(updates, seconds) of the rounds after the first; all rounds when there is only one."""
    rs = r["round_s"]
    if len(rs) < 2:
        return r["updates"], sum(rs)
    per_round = r["updates"] // len(rs)
    return per_round * (len(rs) - 1), sum(rs[1:])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, contender): the median over repeats of seconds per steady-state update."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        key = (r["workload"], r["contender"])
        row = rows.setdefault(key, {"workload": key[0], "contender": key[1], "runs": [], "errors": []})
        if "not_run" in r:
            row["not_run"] = r["not_run"]
        elif "error" in r:
            row["errors"].append(r["error"])
        else:
            row["runs"].append(r)
    out = []
    for row in rows.values():
        ok = row["runs"]
        if ok:
            per_update = [steady(r)[1] / steady(r)[0] for r in ok]
            mid = statistics.median(per_update)
            first = statistics.median(r["round_s"][0] / (r["updates"] // len(r["round_s"])) for r in ok)
            rep = ok[0]
            row.update({"s_per_update": mid, "spread": (max(per_update) - min(per_update)) / mid,
                        "first_s_per_update": first, "updates": steady(rep)[0],
                        "startup_s": statistics.median(r["startup_s"] for r in ok),
                        "acc_round1": rep.get("acc_round1"), "threads": rep["threads"],
                        "workers": rep.get("workers"), "peak_mb": max(r["peak_mb"] for r in ok)})
            if any("gpu_peak_mb" in r for r in ok):
                row["gpu_peak_mb"] = max(r.get("gpu_peak_mb", 0.0) for r in ok)
        out.append(row)
    return out


def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<9} {'contender':<19} {'thr':>3} {'updates':>7} {'s/update':>8} {'spread':>6} "
            f"{'updates/s':>9} {'x floor':>7} {'r1 s/upd':>8} {'startup s':>9} {'acc r1':>7} {'peak MB':>7}")
    gpu = any("gpu_peak_mb" in r for r in rows)
    if gpu:  # torch's peak allocation on the device, beside the host's PSS
        head += f" {'GPU MB':>7}"
    lines = [head, "-" * len(head)]
    floor = {r["workload"]: r for r in rows if r["contender"] == "floor" and "s_per_update" in r}
    for r in rows:
        if "s_per_update" not in r:
            why = r.get("not_run") or "; ".join(r["errors"])
            lines.append(f"{r['workload']:<9} {r['contender']:<19} not run: {why}")
            continue
        f = floor.get(r["workload"])
        ratio = f"{r['s_per_update'] / f['s_per_update']:7.2f}" if f else f"{'-':>7}"
        acc = f"{r['acc_round1'] * 100:7.2f}" if r.get("acc_round1") is not None else f"{'-':>7}"
        thr = f"{r['threads']}x{r['workers']}" if r.get("workers") else str(r["threads"])
        lines.append(f"{r['workload']:<9} {r['contender']:<19} {thr:>3} {r['updates']:>7} {r['s_per_update']:8.3f} "
                     f"{r['spread'] * 100:5.0f}% {1 / r['s_per_update']:9.2f} {ratio} "
                     f"{r['first_s_per_update']:8.3f} {r['startup_s']:9.1f} {acc} {r['peak_mb']:7.0f}"
                     + (f" {r['gpu_peak_mb']:7.0f}" if "gpu_peak_mb" in r else f" {'-':>7}" if gpu else ""))
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], device: str = "cpu") -> list[str]:
    by = {(r["workload"], r["contender"]): r for r in rows if "s_per_update" in r}
    out = []
    for wl in WORKLOADS:
        ser, vec = by.get((wl, "fedslim-serial")), by.get((wl, "fedslim-vectorized"))
        if ser is not None and vec is not None:
            speed = ser["s_per_update"] / vec["s_per_update"]
            if device == "cpu":
                verdict = "the goal is for a GPU; this run is on the CPU"
            else:
                verdict = "met" if speed >= GPU_GOAL else "NOT met"
            out.append(f"{wl} on {device}: fedslim-vectorized runs {speed:.2f}x as fast as fedslim-serial "
                       f"(goal >= {GPU_GOAL:g}x on a GPU): {verdict}")
        for mine in ("fedslim-serial", "fedslim-serial-1t", "fedslim-process"):
            m = by.get((wl, mine))
            if m is None:
                continue
            label = f"{mine} (default: auto = process on CPU)" if mine == DEFAULT_CPU else mine
            for peer, goal in (("flower", 2.5), ("flower-defaults", 2.5), ("pfl", 1.0)):
                p = by.get((wl, peer))
                if p is not None:
                    speed = p["s_per_update"] / m["s_per_update"]
                    verdict = "met" if speed >= goal else "NOT met"
                    out.append(f"{wl}: {label} runs {speed:.2f}x as fast as {peer} (goal >= {goal:g}x): {verdict}")
        # The reference accuracy: the serial backend's, else the first fedslim contender that ran.
        base = next((by[(wl, c)] for c in ("fedslim-serial", "fedslim-serial-1t", "fedslim-process",
                                           "fedslim-ray", "fedslim-vectorized") if (wl, c) in by), None)
        ref = base["acc_round1"] if base else None
        for c in ("fedslim-process", "fedslim-vectorized", "fedslim-ray", "flower", "flower-defaults", "pfl"):
            r = by.get((wl, c))
            if r is not None and r is not base and r.get("acc_round1") is not None and ref is not None:
                out.append(f"{wl}: round-1 accuracy {c} {r['acc_round1'] * 100:.2f} vs {base['contender']} "
                           f"{ref * 100:.2f} (diff {abs(r['acc_round1'] - ref) * 100:.2f} points)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=sorted(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    ap.add_argument("--rounds", type=int, default=None, help="override every workload's rounds")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every contender this many times, interleaved; the table shows medians")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the floor and fedslim's contenders train; on cuda the peers and the process backend "
                         "are listed as not run (CPU only)")
    ap.add_argument("--sample-every", type=float, default=1.0,
                    help="seconds between memory samples of a contender's process tree (default 1)")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    if not args.sample_every > 0:
        ap.error(f"--sample-every: must be a positive number of seconds (got {args.sample_every})")
    for name in ("rounds", "repeat"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name}: must be at least 1 (got {getattr(args, name)})")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            ap.error(f"--device cuda: this environment's torch is a CPU-only build (torch {torch.__version__}); "
                     f"on the GPU machine, put a CUDA build in it first, e.g. {sys.executable} -m pip install "
                     f"--force-reinstall torch==2.13.0 (PyPI's Linux wheels are CUDA builds)")
        ap.error(f"--device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device here")
    try:  # before any contender starts: every one of them would fail on it, one by one
        from fedslim.data.datasets import load_dataset

        load_dataset("mnist", args.data_dir, train_subset=1, test_subset=1)
    except Exception as e:  # noqa: BLE001 (DataError, OSError: whatever the loader says is the reason)
        ap.error(f"--data-dir {args.data_dir}: {e}")
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs{gpu}, load average {os.getloadavg()[0]:.2f} at start")
    runs = []
    for wl in args.workloads:
        print(f"\n== {WORKLOADS[wl].describe()}", flush=True)
        for rep in range(args.repeat):
            for c in args.contenders:
                why = NOT_RUN.get((wl, c)) or (CPU_ONLY.get(c) if args.device != "cpu" else None)
                if why:
                    if rep == 0:
                        runs.append({"contender": c, "workload": wl, "not_run": why})
                    continue
                r = run_contender(c, wl, args.data_dir, args.rounds, args.device, args.sample_every)
                if "error" in r:
                    msg = r["error"]
                else:
                    msg = (f"{r['updates']} updates, rounds " + " + ".join(f"{t:.2f}" for t in r["round_s"])
                           + " s")
                print(f"   {c:<19} {msg}  (wall {r['wall_s']:.0f} s)", flush=True)
                runs.append(r)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    rows = summarize(runs)
    print(fmt_table(rows))
    print()
    for g in goals(rows, args.device):
        print(g)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "rows": [{k: v for k, v in r.items() if k != "runs"}
                                                                      for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
