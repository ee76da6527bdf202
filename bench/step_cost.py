"""What fedslim's host settings (fedslim.engine.host) do to one client training step on one core.

    python bench/step_cost.py [--model lenet5] [--width 1] [--pad-to 8] [--trials 7] [--steps 60] [--procs N]
                              [--compile] [--json FILE]

LeNet-5 on MNIST-shaped batches of 64 with Adam, one torch thread. Variants: the plain loop (NCHW,
torch's default Adam, glibc's allocator defaults), then channels-last, fused Adam, both, and all
three with the allocator settings; then fedslim.engine.rewrite's rewrites on top of those settings
(``pool first``: max-pooling moved before ReLU; ``padded``: narrow channels padded to eight), in
channels-last and, for the padding, in NCHW too (where the engine does not pad); and, last,
fedslim.engine.flat's (``flat``: the parameters and gradients as views of two flat tensors, padded
weights stored padded, one direct fused Adam step): the engine's step as ``train_model`` runs it. The allocator
settings cannot be undone inside a process, so the variants with and without them run in two child
processes, one after the other; inside each, the variants' trials are interleaved so that a machine
that slows down slows all of them. Reported: the median ms per step over the trials, page faults per
step, each variant's speed-up over the plain loop, and each padded variant's over the same without.

``--compile`` adds the tuned variants with and without padding run through ``torch.compile``
(inductor's default mode; its one-time compilation is in the warm-up, not in the trials), to see
whether the compiler beats the eager step (the engine does not compile).

``--procs 2`` runs two such children at once (and reports their mean): what a step costs when two
single-thread workers share the machine, as fedslim's ``process`` backend and Flower's two Ray
clients do in bench/run.sh. The variants need not slow down alike there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench_options import check_options

VARIANTS = {False: ["plain", "channels_last", "fused", "channels_last+fused"],
            True: ["all (+ allocator)", "all + pool first", "all + pool first + padded",
                   "fused (+ allocator) + pool first", "fused (+ allocator) + pool first + padded",
                   "all + pool first + flat", "all + pool first + padded + flat"]}


COMPILED = ["all + pool first + compiled", "all + pool first + padded + compiled"]


def measure(malloc: bool, model: str, width: float, pad_to: int, trials: int,
            steps: int, compile_: bool = False) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from fedslim.config import OptimizerConfig
    from fedslim.engine.client import local_optimizer
    from fedslim.engine.host import tune_malloc
    from fedslim.engine.rewrite import pad_narrow_channels, pool_before_activation
    from fedslim.engine.task import LocalTrain
    from fedslim.models import build_model

    torch.set_num_threads(1)
    if malloc:
        tune_malloc()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1200, 1, 28, 28, generator=g), torch.randint(0, 10, (1200,), generator=g)

    def make(variant: str) -> Any:
        torch.manual_seed(0)
        m = build_model(model, num_classes=10, input_shape=(1, 28, 28), width=width)
        cl = "channels_last" in variant or variant.startswith("all")
        if cl:
            m = m.to(memory_format=torch.channels_last)
        if "pool first" in variant:
            pool_before_activation(m)
        if "padded" in variant:
            pad_narrow_channels(m, pad_to, channels_last=cl)
        fused = "fused" in variant or variant.startswith("all")
        if "flat" in variant:  # the engine's own step
            _, opt, zero_grad = local_optimizer(m, LocalTrain(1, 64, OptimizerConfig(name="adam", lr=1e-3), 1e-3))
        else:
            opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True if fused else None)
            zero_grad = partial(opt.zero_grad, set_to_none=True)
        gen = torch.Generator().manual_seed(1)
        forward = torch.compile(m) if "compiled" in variant else m

        def step() -> None:
            idx = torch.randint(0, len(y), (64,), generator=gen)
            loss = F.cross_entropy(forward(x[idx]), y[idx])
            zero_grad()
            loss.backward()
            opt.step()
        return step

    names = VARIANTS[malloc] + (COMPILED if malloc and compile_ else [])
    probe = build_model(model, num_classes=10, input_shape=(1, 28, 28), width=width)
    if not pad_narrow_channels(probe.to(memory_format=torch.channels_last), pad_to):
        names = [v for v in names if "padded" not in v]  # nothing narrow to pad (main says so)
    steps_of = {v: make(v) for v in names}
    first_s: dict[str, float] = {}
    for v in names:  # warm-up: first-use costs (compilation included) out of the trials
        t = time.perf_counter()
        steps_of[v]()
        first_s[v] = time.perf_counter() - t
        for _ in range(19):
            steps_of[v]()
    ms: dict[str, list[float]] = {v: [] for v in names}
    faults: dict[str, list[float]] = {v: [] for v in names}
    for _ in range(trials):
        for v in names:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            for _ in range(steps):
                steps_of[v]()
            ms[v].append((time.perf_counter() - t) / steps * 1e3)
            faults[v].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    return {v: {"ms_per_step": statistics.median(ms[v]), "spread": (max(ms[v]) - min(ms[v])) / statistics.median(ms[v]),
                "faults_per_step": statistics.median(faults[v]), "first_step_s": first_s[v]} for v in names}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--width", type=float, default=1.0, help="model width (default 1)")
    ap.add_argument("--pad-to", type=int, default=8,
                    help="padded variants: channels padded to this many (default 8, as the engine; more: wider layers)")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--procs", type=int, default=1, help="children measuring at once (default 1)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants of the tuned step")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", choices=["plain", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_options(ap, args, at_least_one=("pad_to", "trials", "steps", "procs"), positive=("width",), model=True)
    if args.child:
        res = measure(args.child == "tuned", args.model, args.width, args.pad_to, args.trials, args.steps,
                      args.compile)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    results: dict[str, dict[str, float]] = {}
    for child in ("plain", "tuned"):
        cmd = [sys.executable, __file__, "--child", child, "--model", args.model, "--width", str(args.width),
               "--pad-to", str(args.pad_to), "--trials", str(args.trials), "--steps", str(args.steps),
               *(["--compile"] if args.compile else [])]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
        runs = []
        for pr in procs:
            out, _ = pr.communicate()
            if pr.returncode != 0:
                raise SystemExit(f"step_cost child {child} failed (exit {pr.returncode})")
            runs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
        for v in runs[0]:
            results[v] = {k: statistics.fmean(r[v][k] for r in runs) for k in runs[0][v]}
    base = results["plain"]["ms_per_step"]
    at_once = f"; {args.procs} processes at once, their mean" if args.procs > 1 else ""
    print(f"{args.model} (width {args.width:g}), batch 64, Adam, 1 thread; median of {args.trials} interleaved "
          f"trials of {args.steps} steps{at_once}")
    print(f"{'variant':<41} {'ms/step':>8} {'spread':>7} {'faults/step':>11} {'speed-up':>8}")
    for v, r in results.items():
        r["speedup"] = base / r["ms_per_step"]
        print(f"{v:<41} {r['ms_per_step']:8.2f} {r['spread'] * 100:6.0f}% {r['faults_per_step']:11.0f} "
              f"{r['speedup']:7.2f}x")
    for v in results:
        for suffix in (" + padded", " + compiled", " + flat"):
            without = v.removesuffix(suffix)
            if without != v and without in results:
                print(f"{v}: {results[without]['ms_per_step'] / results[v]['ms_per_step']:.3f}x {without}")
    if not any("padded" in v for v in results):
        print(f"{args.model} at width {args.width:g} has no channels below {args.pad_to}: no padded variants")
    for v in results:
        if v.endswith(" + compiled"):
            print(f"{v}: first step {results[v]['first_step_s']:.1f} s (compilation)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
