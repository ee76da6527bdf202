"""fedslim's backends against Flower's simulation engine, pfl and a centralized floor, in one run.

    python bench/compare.py [--data-dir DIR] [--workloads lenet heterofl] [--contenders ...] [--json FILE]

Each contender runs in its own process (bench/contender.py) on the same workload; this script samples
the memory of that process and all of its descendants (Ray's raylet, object store and workers
included) and prints one table. Memory is the peak of the summed PSS (proportional set size: a page
shared by k processes counts 1/k in each), so Ray's shared object store is not counted once per
worker. The machine should be otherwise idle: contenders run one after another, and a busy machine
slows them unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
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
              "flower", "pfl"]
# What fedslim's default engine.backend (auto) runs on a multi-core CPU without a GPU.
DEFAULT_CPU = "fedslim-process"
# Pairs that are not run, and why (printed in the table instead of a number).
NOT_RUN = {
    ("heterofl", "flower"): "no HeteroFL in Flower (its strategies send one model to every client)",
    ("heterofl", "pfl"): "no HeteroFL in pfl (one PyTorchModel shared by every user)",
}
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


def run_contender(name: str, workload: str, data_dir: str, rounds: int | None) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "contender.py"), name, workload, "--data-dir", data_dir]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            stop.wait(0.25)

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
                "wall_s": wall, "peak_mb": peak[0]}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update({"wall_s": wall, "peak_mb": peak[0]})
    return res


def fmt_table(results: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<9} {'contender':<19} {'thr':>3} {'updates':>7} {'rounds s':>9} {'updates/s':>9} "
            f"{'x floor':>8} {'startup s':>9} {'acc r1':>7} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    floor = {r["workload"]: r for r in results if r["contender"] == "floor" and "error" not in r}
    for r in results:
        if "error" in r or "not_run" in r:
            why = r.get("not_run") or r["error"]
            lines.append(f"{r['workload']:<9} {r['contender']:<19} not run: {why}")
            continue
        ups = r["updates"] / r["rounds_s"]
        f = floor.get(r["workload"])
        ratio = f"{r['rounds_s'] / r['updates'] / (f['rounds_s'] / f['updates']):8.2f}" if f else f"{'-':>8}"
        acc = f"{r['acc_round1'] * 100:7.2f}" if r.get("acc_round1") is not None else f"{'-':>7}"
        if r["contender"] == "fedslim-process":
            thr = f"{r['threads']}x{r.get('workers', '?')}"
        else:
            thr = f"{r['threads']}x2" if r["contender"] in ("fedslim-ray", "flower") else str(r["threads"])
        lines.append(f"{r['workload']:<9} {r['contender']:<19} {thr:>3} {r['updates']:>7} {r['rounds_s']:9.2f} "
                     f"{ups:9.2f} {ratio} {r['startup_s']:9.1f} {acc} {r['peak_mb']:8.0f}")
    return "\n".join(lines)


def goals(results: list[dict[str, Any]]) -> list[str]:
    by = {(r["workload"], r["contender"]): r for r in results if "error" not in r and "not_run" not in r}
    out = []
    for wl in WORKLOADS:
        base = by.get((wl, "fedslim-serial"))
        if base is None:
            continue
        for mine in ("fedslim-serial", "fedslim-serial-1t", "fedslim-process"):
            m = by.get((wl, mine))
            if m is None:
                continue
            t = m["rounds_s"] / m["updates"]
            label = f"{mine} (default: auto = process on CPU)" if mine == DEFAULT_CPU else mine
            for peer, goal in (("flower", 2.5), ("pfl", 1.0)):
                p = by.get((wl, peer))
                if p is not None:
                    speed = (p["rounds_s"] / p["updates"]) / t
                    verdict = "met" if speed >= goal else "NOT met"
                    out.append(f"{wl}: {label} runs {speed:.2f}x as fast as {peer} (goal >= {goal:g}x): {verdict}")
        ref = base["acc_round1"]
        for c in ("fedslim-process", "fedslim-vectorized", "fedslim-ray", "flower", "pfl"):
            r = by.get((wl, c))
            if r is not None and r.get("acc_round1") is not None and ref is not None:
                out.append(f"{wl}: round-1 accuracy {c} {r['acc_round1'] * 100:.2f} vs serial {ref * 100:.2f} "
                           f"(diff {abs(r['acc_round1'] - ref) * 100:.2f} points)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=sorted(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=CONTENDERS)
    ap.add_argument("--rounds", type=int, default=None, help="override every workload's rounds")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    results = []
    for wl in args.workloads:
        print(f"\n== {WORKLOADS[wl].describe()}", flush=True)
        for c in args.contenders:
            if (wl, c) in NOT_RUN:
                results.append({"contender": c, "workload": wl, "not_run": NOT_RUN[(wl, c)]})
                continue
            r = run_contender(c, wl, args.data_dir, args.rounds)
            msg = r.get("error") or f"{r['updates']} updates in {r['rounds_s']:.2f} s"
            print(f"   {c:<19} {msg}  (wall {r['wall_s']:.0f} s)", flush=True)
            results.append(r)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    print(fmt_table(results))
    print()
    for g in goals(results):
        print(g)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
