"""One cohort's local step, three ways: serial, vectorized through vmap, vectorized as a stacked module.

    python bench/vectorized_step.py [--device cpu|cuda] [--clients 25] [--batch 64] [--steps 8]
                                    [--model lenet5] [--dropout P] [--trials 3] [--threads N] [--rewrite-ab]
                                    [--json FILE]

G clients (``--clients``) of LeNet-5 on MNIST-shaped data, each with ``--steps`` local Adam steps of
``--batch`` samples, run by the serial backend and by the vectorized backend on both of its paths
(``stacked=False`` forces the vmap path). Reported per path: milliseconds per cohort step (one local
step of every client; the median over ``--trials`` runs, interleaved), torch operations dispatched
per cohort step (counted with a TorchDispatchMode) and how many of them compute (not views, not bare
allocations): on a GPU each of those is a kernel launch, which is what bounds a small model's step
there; and each vectorized path's speed-up over serial.

On a CPU, run it twice: at the workload's size (``--batch 64``) the figures are kernel time; with
tiny batches (``--clients 2 --batch 2``) they are mostly the host's cost of issuing a step, which is
what a GPU step of a small model costs. On a GPU, ``--device cuda`` gives the real figure.

``--rewrite-ab`` adds serial and stacked without fedslim.engine.rewrite's exact rewrites (pooling
moved before ReLU), to measure what they save.

``--dropout P`` puts dropout (before the classifier) into the model: the stacked path then replays each
client's masks from its own random state, and the vmap path, which cannot, is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_options import check_options  # noqa: E402

from fedslim.config import OptimizerConfig  # noqa: E402
from fedslim.data.types import DatasetBundle, TensorData  # noqa: E402
from fedslim.engine.backends import SerialBackend  # noqa: E402
from fedslim.engine.store import ClientStore  # noqa: E402
from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec  # noqa: E402
from fedslim.engine.vectorized import VectorizedBackend  # noqa: E402

SHAPE = (1, 28, 28)


# Operations that only allocate or describe memory: on a GPU they launch no kernel.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense"}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.kernels = 0  # the operations that compute (not views, not bare allocations)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        if not func.is_view and func.__name__.split(".")[0] not in _NO_KERNEL:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def _setup(args: argparse.Namespace) -> tuple[ClientStore, list[ClientTask]]:
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    total = n * args.clients
    y = torch.randint(0, 10, (total,), generator=g)
    x = torch.randn(total, *SHAPE, generator=g)
    data = TensorData(x, y)
    bundle = DatasetBundle("synthetic", data, TensorData(x[:8], y[:8]), 10, SHAPE)
    # Channels-last on a CPU, NCHW on CUDA: what the engine's default memory_format picks.
    store = ClientStore(bundle, [torch.arange(c * n, (c + 1) * n) for c in range(args.clients)],
                        device=args.device, channels_last=args.device == "cpu")
    spec = ModelSpec.make(args.model, 10, SHAPE, **({"dropout": args.dropout} if args.dropout else {}))
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in spec.build().state_dict().items()}
    train = LocalTrain(1, args.batch, OptimizerConfig(name="adam", lr=1e-3), 1e-3)
    return store, [ClientTask(client=c, round=0, spec=spec, state=state, train=train, seed=c)
                   for c in range(args.clients)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--clients", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="local steps per client (one epoch of this many batches)")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier (default 0)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--rewrite-ab", action="store_true",
                    help="also run serial and stacked without the engine's exact rewrites (fedslim.engine.rewrite)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_options(ap, args, at_least_one=("clients", "batch", "steps", "trials", "threads"), fraction=("dropout",),
                  model=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch sees no CUDA device here (torch {torch.__version__})")
    store, tasks = _setup(args)
    backends = {
        "serial": SerialBackend(store, device=args.device),
        "vmap": VectorizedBackend(store, device=args.device, stacked=False),
        "stacked": VectorizedBackend(store, device=args.device),
    }
    if args.rewrite_ab:
        backends["serial-norw"] = SerialBackend(store, device=args.device, rewrite=False)
        backends["stacked-norw"] = VectorizedBackend(store, device=args.device, rewrite=False)
    if args.dropout:
        del backends["vmap"]  # it would run the clients serially: vmap cannot replay their masks
    assert backends["stacked"].path(tasks[0].spec) == "stacked"
    ops: dict[str, float] = {}
    kernels: dict[str, float] = {}
    times: dict[str, list[float]] = {k: [] for k in backends}
    for name, b in backends.items():
        b.run(tasks)  # warm-up: plans, kernels, allocator
        with _CountOps() as c:
            b.run(tasks)
        ops[name] = c.n / args.steps
        kernels[name] = c.kernels / args.steps
    for _ in range(args.trials):
        for name, b in backends.items():
            _sync(args.device)
            t = time.perf_counter()
            b.run(tasks)
            _sync(args.device)
            times[name].append((time.perf_counter() - t) / args.steps * 1000)
    ms = {k: statistics.median(v) for k, v in times.items()}
    name = f"{args.model} (dropout {args.dropout})" if args.dropout else args.model
    print(f"{name}, {args.clients} clients x {args.steps} Adam steps of {args.batch} samples, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'path':12s} {'ms/cohort step':>15s} {'ops/cohort step':>16s} {'of which compute':>17s} {'x serial':>9s}")
    for k in backends:
        print(f"{k:12s} {ms[k]:15.2f} {ops[k]:16.0f} {kernels[k]:17.0f} {ms['serial'] / ms[k]:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ms_per_cohort_step": ms, "ops_per_cohort_step": ops,
                                               "compute_ops_per_cohort_step": kernels,
                                               "torch": torch.__version__, "threads": torch.get_num_threads()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
