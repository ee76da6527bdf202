"""What handing out the longest client tasks first (``engine.dispatch``) does to a round's length.

    python bench/dispatch.py [--data-dir ../shared/data] [--alphas 1 0.5 0.1] [--workers 2 4 8 16]
                             [--cohorts 20] [--measure-alpha 0.1] [--rounds 3] [--repeats 2] [--json FILE]

Two parts.

1. Predicted, for many workers: MNIST split over 50 clients (IID and Dirichlet at each alpha), 25 per
   round, the seeds' LeNet-5 setting (5 local epochs, batch 64). Each task's cost is
   fedslim.engine.schedule's estimate; a round is simulated as workers taking the next task as soon as
   they are free, in cohort order or longest first. Reported over ``--cohorts`` cohorts: the ratio of
   the two round lengths, and each one's excess over the lower bound max(total / workers, longest
   task). These are model figures, not timings: they say how much the order can matter.
   Two more columns say what sending each worker a second task, queued behind its running one
   (longest first), would cost: as is, and with an idle worker taking over a queued task at the end
   of the round. This is why the Ray backend sends one task at a time.
2. Measured, on this machine: the same federation at Dirichlet ``--measure-alpha`` on the
   ``process`` backend (one worker per core), ``in_order`` against ``longest_first``, interleaved,
   ``--repeats`` times, for ``--rounds`` rounds. Reported: the seconds spent training clients (the
   median over repeats of each variant's total over the rounds), their ratio, the ratio the cost model
   predicts for those same cohorts on that many workers, and whether both computed the same metrics.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def config(data_dir: str, alpha: float | None, epochs: int, rounds: int, out: str, dispatch: str) -> dict:
    partition: dict[str, Any] = {"kind": "iid"} if alpha is None else {"kind": "dirichlet", "alpha": alpha}
    return {
        "name": f"dispatch-{dispatch}", "seed": 0, "output_dir": out,
        "data": {"dataset": "mnist", "root": data_dir, "num_clients": 50, "partition": partition},
        "model": {"name": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.001}},
        "federation": {"rounds": rounds, "participation": 0.5},
        "eval": {"every": 10_000},
        "engine": {"backend": "process", "progress": False, "dispatch": dispatch},
    }


def makespan(costs: list[float], workers: int) -> float:
    """Length of a round whose tasks are taken, in this order, by whichever worker is free first."""
    free = [0.0] * workers
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def queued_makespan(costs: list[float], workers: int, depth: int = 2, steal: bool = True) -> float:
    """Length of a round whose workers each hold up to ``depth`` tasks (one running, the rest queued
    behind it, in order), one each first, refilled from ``costs`` (in this order) as they finish one.
    With ``steal``, a worker left with nothing once all tasks are out takes over the last task queued
    behind another worker's running one. ``depth=1`` is ``makespan``."""
    pending = list(costs)[::-1]  # pop() takes the next task
    queues: list[list[float]] = [[] for _ in range(workers)]
    busy_until = [0.0] * workers
    now = 0.0

    def refill(w: int) -> None:
        while pending and len(queues[w]) < depth:
            queues[w].append(pending.pop())

    for w in range(workers):  # one task each first, then the queued ones
        if pending:
            queues[w].append(pending.pop())
            busy_until[w] = queues[w][0]
    for w in range(workers):
        refill(w)
    while any(queues):
        w = min((i for i in range(workers) if queues[i]), key=lambda i: busy_until[i])
        now = busy_until[w]
        queues[w].pop(0)
        refill(w)
        if steal and not pending:
            for idle in (i for i in range(workers) if not queues[i]):
                donors = [i for i in range(workers) if len(queues[i]) > 1]
                if donors:
                    queues[idle].append(queues[donors[0]].pop())
                    busy_until[idle] = now + queues[idle][0]
        if queues[w]:
            busy_until[w] = now + queues[w][0]
    return now


def predict(data_dir: str, alphas: list[float | None], workers: list[int], cohorts: int,
            first: int = 1) -> list[dict]:
    from fedslim.config import validate
    from fedslim.data.datasets import load_dataset
    from fedslim.data.partition import make_partition
    from fedslim.engine.run import sample_cohort
    from fedslim.engine.schedule import task_cost
    from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec
    from fedslim.models.profile import profile_spec

    bundle = load_dataset("mnist", data_dir)
    spec = ModelSpec.make("lenet5", bundle.num_classes, bundle.input_shape)
    macs = profile_spec("lenet5", bundle.num_classes, bundle.input_shape)["macs"]
    rows = []
    for alpha in alphas:
        cfg = validate(config(data_dir, alpha, 5, 1, "/tmp", "in_order"))
        parts = make_partition(bundle.train.y.numpy(), 50, cfg.data.partition, 0)
        train = LocalTrain(5, 64, cfg.train.optimizer, cfg.train.optimizer.lr)
        rounds = []
        for r in range(first, first + cohorts):
            task = ClientTask(client=0, round=r, spec=spec, state={}, train=train)
            costs = [task_cost(task, len(parts[c]), macs) for c in sample_cohort(0, r, 50, 0.5)]
            rounds.append(costs)
        sizes = [len(p) for p in parts]
        for w in workers:
            fifo = sum(makespan(c, w) for c in rounds)
            lpt = sum(makespan(sorted(c, reverse=True), w) for c in rounds)
            bound = sum(max(sum(c) / w, max(c)) for c in rounds)
            queued = [sum(queued_makespan(sorted(c, reverse=True), w, steal=st) for c in rounds)
                      for st in (False, True)]
            rows.append({"alpha": alpha, "workers": w, "in_order_over_longest_first": fifo / lpt,
                         "in_order_over_bound": fifo / bound, "longest_first_over_bound": lpt / bound,
                         "ray_queued_over_bound": queued[0] / bound, "ray_stealing_over_bound": queued[1] / bound,
                         "client_samples_min": min(sizes), "client_samples_max": max(sizes)})
    return rows


def measure(data_dir: str, alpha: float, rounds: int, repeats: int) -> dict:
    from fedslim.config import validate
    from fedslim.engine.run import Runner
    from fedslim.results import read_jsonl

    seconds: dict[str, list[float]] = {"in_order": [], "longest_first": []}
    metrics: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for dispatch in seconds:
            with tempfile.TemporaryDirectory() as tmp:
                runner = Runner(validate(config(data_dir, alpha, 5, rounds, tmp, dispatch)), progress=False,
                                out=open(os.devnull, "w"))  # noqa: SIM115
                runner.run()
                timings = read_jsonl(runner.run_dir / "timings.jsonl")
                rows = read_jsonl(runner.run_dir / "metrics.jsonl")
            seconds[dispatch].append(sum(t["clients_s"] for t in timings))
            metrics.setdefault(dispatch, rows)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"alpha": alpha, "rounds": rounds, "repeats": repeats, "clients_s": seconds,
            "median_clients_s": med, "ratio": med["in_order"] / med["longest_first"],
            "same_metrics": metrics["in_order"] == metrics["longest_first"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.1],
                    help="Dirichlet concentrations to predict for (an IID split is always included)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--cohorts", type=int, default=20)
    ap.add_argument("--measure-alpha", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args()
    for name in ("cohorts", "rounds", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if min(a.workers) < 1 or min(a.alphas) <= 0 or a.measure_alpha <= 0:
        ap.error("--workers must be at least 1, --alphas and --measure-alpha above 0")

    pred = predict(a.data_dir, [None, *a.alphas], a.workers, a.cohorts)
    print(f"Predicted (cost model), LeNet-5 / MNIST, 50 clients, 25 per round, 5 local epochs, {a.cohorts} cohorts")
    print(f"{'split':<14} {'samples/client':>15} {'workers':>7} {'in-order / longest-first':>25} "
          f"{'in-order / bound':>17} {'longest-first / bound':>22} {'ray 2 queued / bound':>21} "
          f"{'ray + stealing / bound':>23}")
    for r in pred:
        split = "iid" if r["alpha"] is None else f"dirichlet {r['alpha']:g}"
        print(f"{split:<14} {r['client_samples_min']:>7}-{r['client_samples_max']:<7} {r['workers']:>7} "
              f"{r['in_order_over_longest_first']:>24.3f}x {r['in_order_over_bound']:>16.3f}x "
              f"{r['longest_first_over_bound']:>21.3f}x {r['ray_queued_over_bound']:>20.3f}x "
              f"{r['ray_stealing_over_bound']:>22.3f}x")
    sys.stdout.flush()
    from fedslim.engine.process_backend import usable_cpus

    meas = measure(a.data_dir, a.measure_alpha, a.rounds, a.repeats)
    meas["predicted_ratio"] = predict(a.data_dir, [a.measure_alpha], [usable_cpus()], a.rounds)[0][
        "in_order_over_longest_first"]
    ms = meas["median_clients_s"]
    print(f"\nMeasured here (process backend, {usable_cpus()} workers), dirichlet {a.measure_alpha:g}, 5 local "
          f"epochs, {a.rounds} rounds, median of {a.repeats}: clients_s in_order {ms['in_order']:.2f} s, "
          f"longest_first {ms['longest_first']:.2f} s: longest_first {meas['ratio']:.3f}x as fast (the cost "
          f"model predicts {meas['predicted_ratio']:.3f}x for these rounds); same metrics: {meas['same_metrics']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"predicted": pred, "measured": meas}, indent=1))
    return 0 if meas["same_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
