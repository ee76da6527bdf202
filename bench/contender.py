"""Run one contender on one workload and print one ``RESULT {json}`` line.

    python bench/contender.py CONTENDER WORKLOAD [--data-dir DIR]

CONTENDER: floor | fedslim-serial | fedslim-serial-1t | fedslim-process | fedslim-vectorized | fedslim-ray |
flower | flower-defaults | pfl. ``fedslim-serial`` and ``fedslim-vectorized`` run on torch's own
thread count (vectorized's wide batched kernels are what use the cores there); every other
single-process contender, the floor included, runs torch on one thread. The
parallel ones run one single-thread client per core: fedslim-process (what fedslim's default ``auto``
picks on a multi-core CPU) as forked workers, fedslim-ray and flower as Ray actors.
flower-defaults keeps Flower's default client resources (2 CPUs per virtual client: one client at a
time on a 2-core machine, torch on the threads Ray gives the actor). ``compare.py``
runs each in its own process, so that peak memory is the contender's own and no Ray cluster outlives
its run. Every contender reports the same figures:

* ``round_s``: seconds of each federated round (sending, client training, aggregation), central
  evaluation and start-up excluded; ``updates``: client updates trained in all of them. The first
  round also holds each contender's lazy one-time work (imports, kernel generation, Ray actors'
  first task), so compare.py reports the rounds after it apart.
* ``startup_s``: everything before the first round (data, Ray cluster and workers, ...).
* ``acc_round1``: accuracy of the global model on the MNIST test set after round 1, to check that
  the contenders ran the same workload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import DEFAULT_DATA, WORKLOADS, Workload, batches, fedslim_config, setup  # noqa: E402

T0 = time.perf_counter()


def run_fedslim(w: Workload, backend: str, data_dir: str, threads: int | None, device: str) -> dict[str, Any]:
    from fedslim.config import validate
    from fedslim.engine.run import Runner
    from fedslim.results import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(validate(fedslim_config(w, backend, data_dir, tmp, threads, device)), progress=False,
                        out=open(os.devnull, "w"))  # noqa: SIM115
        runner.run()
        timings = read_jsonl(runner.run_dir / "timings.jsonl")
        rows = read_jsonl(runner.run_dir / "metrics.jsonl")
    total = time.perf_counter() - T0
    round_s = [t["plan_down_s"] + t["clients_s"] + t["up_aggregate_s"] for t in timings]
    rounds_s = sum(round_s)
    eval_s = sum(t["eval_s"] for t in timings)
    ev = rows[0]["eval"]
    acc = ev["global"]["acc"] if "global" in ev else ev[next(iter(ev))]["acc"]
    # bn_query_s (HeteroFL's static-BN query before evaluation) is left out of rounds_s like evaluation:
    # it prepares the evaluated model, and neither the floor nor a peer does it. It is reported apart.
    parts = {k: round(sum(t.get(k, 0.0) for t in timings), 3)
             for k in ("plan_down_s", "clients_s", "up_aggregate_s", "bn_query_s")}
    return {"updates": sum(len(c["bytes_up"]) for r in rows for c in r["comm"]), "round_s": round_s, **parts,
            "startup_s": total - rounds_s - eval_s - parts["bn_query_s"], "acc_round1": acc,
            "acc_label": "global" if "global" in ev else next(iter(ev))}


def client_levels(w: Workload) -> list[float]:
    """Width of every client's model (HeteroFL's fixed assignment: equal shares by client index)."""
    if w.algorithm != "heterofl":
        return [1.0] * w.clients
    from fedslim.algorithms.heterofl import PAPER_RATES, parse_model_split
    from fedslim.devices import split_counts

    split = parse_model_split(w.params["model_split"], PAPER_RATES)
    counts = split_counts([s for _, _, s in split], w.clients)
    return [rate for (_, rate, _), k in zip(split, counts, strict=True) for _ in range(k)]


def run_floor(w: Workload, data_dir: str, device: str) -> dict[str, Any]:
    """A bare torch loop: for every client update of the workload, the same number of optimizer
    steps at the same batch sizes on a model of the same width, drawn from the whole training set;
    one model per width, no federation, no copies of weights, nothing sent anywhere."""
    from fedslim.models import build_model

    s = setup(w, data_dir)
    x, y = s.bundle.train.x.to(device), s.bundle.train.y.to(device)
    levels = client_levels(w)
    models, opts = {}, {}
    for rate in sorted(set(levels)):
        opts_kw = {"track_running_stats": False, "scaler_rate": rate} if w.algorithm == "heterofl" else {}
        torch.manual_seed(0)
        models[rate] = build_model(w.model, num_classes=s.bundle.num_classes, input_shape=s.bundle.input_shape,
                                   width=rate, **opts_kw).to(device)
        opts[rate] = torch.optim.Adam(models[rate].parameters(), lr=w.lr)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    updates, round_s = 0, []
    for cohort in s.cohorts:
        t_round = time.perf_counter()
        for c in cohort:
            model, opt = models[levels[c]], opts[levels[c]]
            n = len(s.parts[c])
            sizes = [len(b) for _ in range(w.epochs) for b in batches(n, w.batch_size, gen)][:w.max_steps]
            # One copy of the update's indices to the device: a copy per step would wait for the GPU.
            drawn = torch.randint(0, len(y), (sum(sizes),), generator=gen).to(device).split(sizes)
            for idx in drawn:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            updates += 1
        if device != "cpu":
            torch.cuda.synchronize()
        round_s.append(time.perf_counter() - t_round)
    return {"updates": updates, "round_s": round_s, "startup_s": t0 - T0, "acc_round1": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("contender")
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=None, help="override the workload's rounds")
    ap.add_argument("--epochs", type=int, default=None, help="override the workload's local epochs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the floor and fedslim's contenders train (Flower and pfl: cpu only here)")
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    if args.rounds or args.epochs:
        from dataclasses import replace

        w = replace(w, rounds=args.rounds or w.rounds, epochs=args.epochs or w.epochs)
    own_threads = ("fedslim-serial", "fedslim-vectorized")
    if args.contender not in own_threads:
        torch.set_num_threads(1)
    if args.device != "cpu" and not (args.contender == "floor" or args.contender.startswith("fedslim-")):
        raise SystemExit(f"{args.contender}: runs on the CPU only in this benchmark")
    if args.contender == "floor":
        res = run_floor(w, args.data_dir, args.device)
    elif args.contender in own_threads:
        res = run_fedslim(w, args.contender.removeprefix("fedslim-"), args.data_dir, None, args.device)
    elif args.contender.startswith("fedslim-"):
        backend = args.contender.removeprefix("fedslim-").removesuffix("-1t")
        res = run_fedslim(w, backend, args.data_dir, 1, args.device)
    elif args.contender in ("flower", "flower-defaults"):
        from peer_flower import run_flower

        res = run_flower(w, args.data_dir, T0, defaults=args.contender == "flower-defaults")
    elif args.contender == "pfl":
        from peer_pfl import run_pfl

        res = run_pfl(w, args.data_dir, T0)
    else:
        raise SystemExit(f"unknown contender {args.contender!r}")
    res.setdefault("threads", torch.get_num_threads())  # torch threads per client (Flower reports its own)
    if args.device == "cuda":  # the sampled PSS is host memory only
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res.update({"contender": args.contender, "workload": w.name, "rounds": w.rounds, "device": args.device,
                "torch": torch.__version__})
    if args.contender in ("fedslim-process", "fedslim-ray"):
        from fedslim.engine.process_backend import usable_cpus

        res["workers"] = usable_cpus()  # both backends' default: one single-thread worker per usable core
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
