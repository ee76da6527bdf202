"""The order in which a pool of workers takes a cohort's client tasks: the costliest first.

A round ends when its last task does. Taken in cohort order, a long task that happens to come last
starts when the other workers are nearly done, and they wait for it. Handing out the longest tasks
first (LPT, longest processing time first) leaves the short ones to fill the gaps at the end. With
Dirichlet splits the clients' sizes differ many-fold; over 20 cohorts of 25 LeNet clients from a
Dirichlet(0.1) split of MNIST, the cohort-order round was 1.05x the longest-first round on 2 workers,
1.15x on 4 and 1.39x on 8 (``bench/dispatch.py``, from the clients' step counts).

Only the dispatch order changes: every task seeds itself and the backends return results in task
order, so what is computed and aggregated is the same bit for bit.

The cost of a task is an estimate, good enough to rank tasks: its optimizer steps times a fixed cost
per step plus three times (forward and backward) the samples it trains on times its model's MACs per
sample. Forward-only tasks (evaluation, BN statistics) count their samples once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientTask, ModelSpec

log = logging.getLogger(__name__)

DISPATCH_ORDERS = ("longest_first", "in_order")
# The per-step cost that does not grow with the model (Python, dispatch, optimizer launch), as MACs:
# a LeNet-5 step on one core here costs ~1.4 ms more than its arithmetic, about 2e7 MACs at the
# ~12 GMAC/s a whole step averages (bench/step_cost.py). It keeps tiny models' many steps from
# ranking as free.
STEP_OVERHEAD_MACS = 2e7
# Batch of a forward-only task, for its step count (fedslim.metrics.evaluate's default).
EVAL_BATCH = 1000


def _macs(spec: ModelSpec) -> float:
    from fedslim.models.profile import profile_spec  # cached per spec there

    try:
        return float(profile_spec(spec.name, spec.num_classes, spec.input_shape, spec.width,
                                  **dict(spec.options))["macs"])
    except Exception as e:  # a model that cannot be profiled on meta tensors: rank by steps alone
        log.debug("no MAC count for %s (%s); its tasks are ranked by steps only", spec.name, e)
        return 0.0


def task_cost(task: ClientTask, num_samples: int, macs_per_sample: float) -> float:
    """Estimated cost of ``task`` in MACs (see the module docstring)."""
    tr = task.train
    if tr is None:  # forward only
        steps = math.ceil(num_samples / int(task.extras.get("batch_size", EVAL_BATCH)))
        return steps * STEP_OVERHEAD_MACS + num_samples * macs_per_sample
    steps = tr.epochs * math.ceil(num_samples / tr.batch_size)
    samples = tr.epochs * num_samples
    if tr.max_steps is not None and steps > tr.max_steps:
        steps, samples = tr.max_steps, tr.max_steps * tr.batch_size
    return steps * STEP_OVERHEAD_MACS + 3 * samples * macs_per_sample


def dispatch_order(tasks: Sequence[ClientTask], store: ClientStore, order: str = "longest_first") -> list[int]:
    """Positions of ``tasks`` in the order workers should take them; ties keep cohort order."""
    if order not in DISPATCH_ORDERS:
        raise ValueError(f"engine.dispatch: unknown value {order!r}; allowed: {', '.join(DISPATCH_ORDERS)}")
    if order == "in_order":
        return list(range(len(tasks)))
    costs = [task_cost(t, store.num_samples(t.client, t.extras.get("split", "train")), _macs(t.spec))
             for t in tasks]
    return sorted(range(len(tasks)), key=lambda k: -costs[k])  # sorted() is stable: ties in cohort order
