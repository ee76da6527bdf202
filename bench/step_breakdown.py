"""Where one client training step's time goes: oneDNN's kernels against everything else.

    python bench/step_breakdown.py [--model lenet5] [--width 1] [--batch 64] [--steps 60] [--trials 7] [--json FILE]

Two steps on one core (batches of 64 MNIST-shaped inputs unless ``--batch`` says otherwise, Adam):
the *plain* one, as a Flower or pfl client runs it (NCHW, torch's default Adam, no rewrites), and
fedslim's *tuned* one (the model from the engine's own ``ModelBuffers``: channels-last, pooling
before ReLU, narrow channels padded; flattened and stepped by fused Adam as ``train_model`` does,
fedslim.engine.flat; the allocator settings). For each, one child
process times the step, and a second child, with ``ONEDNN_VERBOSE=1``, runs the same steps and
prints every oneDNN primitive it executes with the primitive's own time. The table gives those
times per step, grouped by primitive (convolutions, and reorders of tensors between memory
layouts), and what is left: pooling, the linear layers, activations, the loss, the optimizer and
the framework around them.

What it answers: how far the step could fall if only the convolutions (which every engine running
this model in torch shares) cost anything, and so the highest ratio to a plain client that a faster
rest of the step could reach. ``--batch 1`` shows the part of a step that does not grow with the
batch: the framework around the kernels, and kernels too small to be worth their call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

from bench_options import check_options

BEGIN, END = "STEPS_BEGIN", "STEPS_END"


def parse_verbose(lines: list[str], steps: int) -> dict[str, float]:
    """Milliseconds per step of every oneDNN primitive executed between the BEGIN and END markers,
    keyed ``"kind propagation problem"`` (``onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,PROP,
    ...,PROBLEM,MS``)."""
    if steps < 1:
        raise ValueError(f"steps: must be at least 1 (got {steps})")
    try:
        start, stop = lines.index(BEGIN), lines.index(END)
    except ValueError as e:
        raise ValueError("parse_verbose: the step markers are missing from the child's output") from e
    ms: dict[str, float] = defaultdict(float)
    for ln in lines[start + 1:stop]:
        f = ln.split(",")
        if len(f) < 9 or f[0] != "onednn_verbose" or f[2] != "primitive" or f[3] != "exec":
            continue
        prop = f[7] if f[7] != "undef" else ""
        ms[" ".join(p for p in (f[5], prop, f[-2]) if p)] += float(f[-1])
    return {k: v / steps for k, v in ms.items()}


def child(variant: str, model: str, width: float, batch: int, steps: int, trials: int, verbose: bool) -> None:
    import torch
    import torch.nn.functional as F

    from fedslim.config import OptimizerConfig
    from fedslim.engine.backends import ModelBuffers
    from fedslim.engine.client import local_optimizer
    from fedslim.engine.host import tune_malloc
    from fedslim.engine.task import LocalTrain, ModelSpec

    torch.set_num_threads(1)
    tuned = variant == "tuned"
    if tuned:
        tune_malloc()
    torch.manual_seed(0)
    spec = ModelSpec.make(model, 10, (1, 28, 28), width=width)
    m = ModelBuffers("cpu", channels_last=True).get(spec) if tuned else spec.build()
    if tuned:  # the engine's own step
        _, opt, zero_grad = local_optimizer(m, LocalTrain(1, batch, OptimizerConfig(name="adam", lr=1e-3), 1e-3))
    else:
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        zero_grad = partial(opt.zero_grad, set_to_none=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1200, 1, 28, 28, generator=g), torch.randint(0, 10, (1200,), generator=g)

    def step() -> None:
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(m(x[idx]), y[idx])
        zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    if verbose:
        print(BEGIN, flush=True)
        for _ in range(steps):
            step()
        print(END, flush=True)
        return
    ms = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        ms.append((time.perf_counter() - t) / steps * 1e3)
    print("RESULT " + json.dumps({"ms_per_step": statistics.median(ms)}), flush=True)


def run_child(args: argparse.Namespace, variant: str, verbose: bool) -> list[str]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1" if verbose else "0"}
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--width", str(args.width),
           "--batch", str(args.batch), "--steps", str(args.steps), "--trials", str(args.trials),
           *(["--verbose"] if verbose else [])]
    pr = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if pr.returncode != 0:
        raise SystemExit(f"step_breakdown: the {variant} child failed (exit {pr.returncode}): "
                         f"{pr.stderr.strip()[-300:]}")
    return pr.stdout.splitlines()


def group(name: str) -> str:
    kind = name.split(" ")[0]
    if kind == "convolution":
        return " ".join(name.split(" ")[:2])
    return f"{kind} (layout changes)" if kind == "reorder" else kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64, help="samples per step (default 64)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", choices=["plain", "tuned"], help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_options(ap, args, at_least_one=("batch", "steps", "trials"), positive=("width",), model=True)
    if args.child:
        child(args.child, args.model, args.width, args.batch, args.steps, args.trials, args.verbose)
        return 0
    out: dict[str, Any] = {}
    for variant in ("plain", "tuned"):
        timed = run_child(args, variant, verbose=False)
        step_ms = json.loads(next(ln for ln in timed if ln.startswith("RESULT "))[7:])["ms_per_step"]
        prims = parse_verbose(run_child(args, variant, verbose=True), args.steps)
        groups: dict[str, float] = defaultdict(float)
        for k, v in prims.items():
            groups[group(k)] += v
        onednn = sum(prims.values())
        out[variant] = {"ms_per_step": step_ms, "onednn_ms": onednn, "rest_ms": step_ms - onednn,
                        "groups": dict(groups), "primitives": prims}
    print(f"{args.model} (width {args.width:g}), batch {args.batch}, Adam, 1 thread: ms per step "
          f"(step: median of {args.trials} trials of {args.steps}; oneDNN: its own times over {args.steps} steps)")
    print(f"{'':<36} {'plain':>8} {'tuned':>8}")
    names = sorted({g for v in out.values() for g in v["groups"]})
    for n in names:
        print(f"  {n:<34} " + " ".join(f"{out[v]['groups'].get(n, 0.0):8.3f}" for v in ("plain", "tuned")))
    for label, key in (("oneDNN, all", "onednn_ms"), ("everything else", "rest_ms"), ("step", "ms_per_step")):
        print(f"{label:<36} " + " ".join(f"{out[v][key]:8.3f}" for v in ("plain", "tuned")))
    p, t = out["plain"], out["tuned"]
    print(f"tuned step: {p['ms_per_step'] / t['ms_per_step']:.2f}x the plain one; "
          f"oneDNN {p['onednn_ms'] / t['onednn_ms']:.2f}x, everything else {p['rest_ms'] / t['rest_ms']:.2f}x")
    print(f"tuned step with nothing but its oneDNN time: {p['ms_per_step'] / t['onednn_ms']:.2f}x the plain step "
          f"({t['onednn_ms'] / t['ms_per_step']:.0%} of the tuned step is oneDNN)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
