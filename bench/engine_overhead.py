"""Engine overhead: fedslim's serial FedAvg against a plain centralized torch loop.

Workload (the seeds' LeNet & MNIST setting): 50 clients, 25 per round, 5 local epochs, batch 64,
Adam 1e-3. The floor is one torch loop doing the same number of optimizer steps at the same batch
sizes on the same model, with no federation around it. Both run in this process, interleaved, so
the ratio is robust to a noisy machine; absolute figures are not comparable across machines.

    python bench/engine_overhead.py [--data-dir ../shared/data] [--rounds 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_options import check_options

from fedslim.config import validate
from fedslim.engine.run import Runner
from fedslim.results import read_jsonl


def config(data_dir: str, dataset: str, rounds: int, out: str, name: str) -> dict:
    return {
        "name": name, "seed": 0, "output_dir": out,
        "data": {"dataset": dataset, "root": data_dir, "num_clients": 50, "partition": {"kind": "iid"}},
        "model": {"name": "lenet5"},
        "train": {"epochs": 5, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.001}},
        "federation": {"rounds": rounds, "participation": 0.5},
        "eval": {"every": 10_000},
        # serial: the floor is one process too, so the ratio is the engine's own cost, not parallelism.
        "engine": {"backend": "serial", "progress": False, "threads": torch.get_num_threads()},
    }


def engine_round_seconds(cfg: dict) -> tuple[float, int]:
    """Seconds spent in federated rounds (evaluation excluded) and the number of client updates."""
    runner = Runner(validate(cfg), progress=False, out=open("/dev/null", "w"))  # noqa: SIM115
    runner.run()
    timings = read_jsonl(runner.run_dir / "timings.jsonl")
    rows = read_jsonl(runner.run_dir / "metrics.jsonl")
    secs = sum(t["plan_down_s"] + t["clients_s"] + t["up_aggregate_s"] for t in timings)
    updates = sum(len(c["bytes_up"]) for r in rows for c in r["comm"])
    return secs, updates


def floor_seconds(runner_cfg: dict, batch_sizes: list[int]) -> float:
    """A bare loop: same model, optimizer and batch sizes, data already in memory, no federation."""
    from fedslim.data.datasets import load_dataset
    from fedslim.models import build_model

    d = runner_cfg["data"]
    bundle = load_dataset(d["dataset"], d["root"])
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = bundle.train.x, bundle.train.y
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    model.train()
    t0 = time.perf_counter()
    pos = 0
    for bs in batch_sizes:
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(y), generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def batch_schedule(cfg: dict) -> list[int]:
    """The batch sizes the engine's clients step through (same rule as fedslim.engine.client._batches)."""
    from fedslim.data.datasets import load_dataset
    from fedslim.data.partition import make_partition
    from fedslim.engine.run import sample_cohort

    v = validate(cfg)
    bundle = load_dataset(v.data.dataset, v.data.root)
    parts = make_partition(bundle.train.y.numpy(), v.data.num_clients, v.data.partition, v.seed)
    sizes: list[int] = []
    for rnd in range(1, v.federation.rounds + 1):
        for c in sample_cohort(v.seed, rnd, v.data.num_clients, v.federation.participation):
            n = len(parts[c])
            per_epoch = [min(v.train.batch_size, n - i) for i in range(0, n, v.train.batch_size)]
            if len(per_epoch) > 1 and per_epoch[-1] == 1:
                per_epoch[-2] += per_epoch.pop()
            sizes += per_epoch * v.train.epochs
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    check_options(ap, args, at_least_one=("rounds", "repeats"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = None
    eng, flo = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            cfg = config(args.data_dir, args.dataset, args.rounds, tmp, f"bench{rep}")
            if sizes is None:
                sizes = batch_schedule(cfg)
            secs, updates = engine_round_seconds(cfg)
            eng.append(secs)
            flo.append(floor_seconds(cfg, sizes))
    best_e, best_f = min(eng), min(flo)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "workload": f"lenet5/{args.dataset}, 50 clients, 25/round, 5 epochs, batch 64, Adam 1e-3, "
                    f"{args.rounds} rounds",
        "client_updates": updates, "optimizer_steps": len(sizes or []),
        "engine_s": round(best_e, 3), "floor_s": round(best_f, 3),
        "client_updates_per_s": round(updates / best_e, 3),
        "floor_equivalent_updates_per_s": round(updates / best_f, 3),
        "engine_over_floor": round(best_e / best_f, 4),
        "overhead_pct": round((best_e / best_f - 1) * 100, 2),
        "peak_rss_mb": round(peak_mb, 1), "torch_threads": torch.get_num_threads(),
        "repeats": {"engine_s": [round(e, 3) for e in eng], "floor_s": [round(f, 3) for f in flo]},
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
