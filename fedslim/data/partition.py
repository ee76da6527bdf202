"""Split a dataset's training labels across clients: registered partitioners + local test splits.

A partitioner is ``partition(labels, num_clients, cfg, rng) -> list[np.ndarray]``: one sorted int64
index array per client; for every kind here the arrays are disjoint and cover all samples. Infeasible
settings raise ValueError naming the config field.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedslim.config import PartitionConfig
from fedslim.registry import PARTITIONERS
from fedslim.rng import np_gen

Parts = list[np.ndarray]


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"data.num_clients: must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(f"data.num_clients: {num_clients} clients but only {len(labels)} samples")
    return labels


def _check_min_size(n: int, num_clients: int, min_size: int) -> None:
    if min_size * num_clients > n:
        raise ValueError(f"data.partition.min_size: {num_clients} clients x min_size {min_size} = "
                         f"{num_clients * min_size} exceeds the {n} samples; lower data.partition.min_size to "
                         f"at most {n // num_clients} or data.num_clients to at most {n // min_size}")


def _check_alpha(alpha: float) -> None:
    # The config accepts inf (YAML .inf, --set ...=inf); numpy's Dirichlet then draws NaN shares, which left
    # every client but the last empty and silently topped up to min_size.
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"data.partition.alpha: must be a finite number > 0, got {alpha}; large values (e.g. "
                         f"1000) give near-equal shares, and data.partition.kind=iid an exactly even split")


def _finish(parts: Sequence[np.ndarray]) -> Parts:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total``."""
    raw = weights / weights.sum() * total
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


@PARTITIONERS.register("iid", "shuffle, then near-equal contiguous split")
def iid(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator) -> Parts:
    labels = _check(labels, num_clients)
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


@PARTITIONERS.register("dirichlet", "per-class Dirichlet(alpha) shares over clients (label skew)")
def dirichlet(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator) -> Parts:
    """Each class is split across clients by proportions ~ Dirichlet(alpha) (Hsu et al., 2019).

    Draws are repeated up to ``max_tries`` times until every client has ``min_size`` samples. Only
    the proportions are redrawn (client sizes follow from them), so a try is cheap. At small alpha
    that may never happen, so the draw with the largest smallest client is kept and its smallest
    clients are topped up with random samples of the largest ones, which ends in at most
    ``num_clients`` moves.
    """
    labels = _check(labels, num_clients)
    _check_alpha(cfg.alpha)
    _check_min_size(len(labels), num_clients, cfg.min_size)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n_c = np.array([len(ix) for ix in by_class])

    best: np.ndarray | None = None  # counts (classes x clients)
    for _ in range(cfg.max_tries):
        props = rng.dirichlet(np.full(num_clients, cfg.alpha), size=len(classes))
        # Rounded, not floored as in the usual implementations: flooring a cumulative share that sums
        # to 1 - 1e-16 hands the last client one stray sample of every class.
        cuts = np.rint(np.cumsum(props, axis=1) * n_c[:, None]).astype(np.int64)
        cuts[:, -1] = n_c
        counts = np.diff(np.concatenate([np.zeros((len(classes), 1), np.int64), cuts], axis=1), axis=1)
        if best is None or counts.sum(0).min() > best.sum(0).min():
            best = counts
        if counts.sum(0).min() >= cfg.min_size:
            break
    assert best is not None
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, ix in enumerate(by_class):
        for k, chunk in enumerate(np.split(ix, np.cumsum(best[ci])[:-1])):
            if len(chunk):
                parts[k].append(chunk)
    flat = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    return _finish(_top_up(flat, cfg.min_size, rng))


def _top_up(parts: Parts, min_size: int, rng: np.random.Generator) -> Parts:
    """Move random samples from the largest clients to those under ``min_size``.

    Each step either fills the smallest client or brings the largest down to ``min_size``, so it
    stops after at most ``len(parts)`` steps (feasibility, N >= clients * min_size, was checked).
    """
    parts = [rng.permutation(p) for p in parts]
    sizes = np.array([len(p) for p in parts])
    while sizes.min() < min_size:
        i, j = int(sizes.argmin()), int(sizes.argmax())
        k = int(min(min_size - sizes[i], sizes[j] - min_size))
        parts[i] = np.concatenate([parts[i], parts[j][:k]])
        parts[j] = parts[j][k:]
        sizes[i] += k
        sizes[j] -= k
    return parts


@PARTITIONERS.register("pathological", "label shards: each client gets classes_per_client single-label shards")
def pathological(labels: np.ndarray, num_clients: int, cfg: PartitionConfig,
                 rng: np.random.Generator) -> Parts:
    """McMahan et al. (2017) shards, as HeteroFL uses them: samples sorted by label are cut into
    ``num_clients * classes_per_client`` shards and each client gets ``classes_per_client`` of them.

    Unlike cutting the sorted array into equal pieces, no shard straddles two labels (each class is
    cut into a number of shards proportional to its size), so a client really holds at most
    ``classes_per_client`` labels.
    """
    labels = _check(labels, num_clients)
    k = cfg.classes_per_client
    shards = num_clients * k
    classes = np.unique(labels)
    if k > len(classes):  # more shards each than there are labels: clients would hold nearly all, as if IID
        raise ValueError(f"data.partition.classes_per_client: {k} is more than the {len(classes)} classes in "
                         f"the training data; use at most {len(classes)} (or data.partition.kind=iid)")
    if shards < len(classes):
        raise ValueError(f"data.partition.classes_per_client: {num_clients} clients x {k} shards = {shards} "
                         f"cannot cover all {len(classes)} classes; need at least {len(classes)} shards")
    if shards > len(labels):
        raise ValueError(f"data.partition.classes_per_client: {num_clients} clients x {k} = {shards} shards "
                         f"but only {len(labels)} samples")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n_c = np.array([len(ix) for ix in by_class], dtype=np.float64)
    # One shard per class first (every class must be covered), the rest by size.
    per_class = 1 + _largest_remainder(n_c, shards - len(classes))
    while (over := per_class > n_c).any():  # a tiny class cannot fill its shards: hand them on
        c = int(np.flatnonzero(over)[0])
        spare = int(per_class[c] - n_c[c])
        per_class[c] -= spare
        room = n_c - per_class
        room[c] = 0
        per_class[int(room.argmax())] += spare
    pieces = [piece for ix, m in zip(by_class, per_class, strict=True) for piece in np.array_split(ix, m)]
    order = rng.permutation(len(pieces))
    return _finish([np.concatenate([pieces[s] for s in order[i * k:(i + 1) * k]]) for i in range(num_clients)])


@PARTITIONERS.register("quantity", "iid labels, client sizes ~ Dirichlet(alpha), each >= min_size")
def quantity(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator) -> Parts:
    """Quantity skew: sizes are ``min_size`` plus a Dirichlet(alpha) share of the rest, so they
    sum to N exactly without redraws."""
    labels = _check(labels, num_clients)
    n = len(labels)
    _check_alpha(cfg.alpha)
    _check_min_size(n, num_clients, cfg.min_size)
    share = rng.dirichlet(np.full(num_clients, cfg.alpha))
    sizes = cfg.min_size + _largest_remainder(share, n - cfg.min_size * num_clients)
    return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def make_partition(labels: np.ndarray | Sequence[int], num_clients: int, cfg: PartitionConfig,
                   seed: int) -> Parts:
    """Partition with the run's ``partition`` random stream (independent of every other stream)."""
    fn = PARTITIONERS.get(cfg.kind, field="data.partition.kind")
    return fn(np.asarray(labels), num_clients, cfg, np_gen(seed, "partition"))


def _split_one(idx: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(idx, dtype=np.int64)
    n = len(idx)
    n_test = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)  # keep both sides non-empty when there is any choice
    elif n < 2:
        n_test = 0  # a one-sample client trains on it: a client with no training data would only send zeros
    perm = rng.permutation(idx)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_local_test(indices: np.ndarray | Sequence[np.ndarray], fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
    """Hold out ``fraction`` of a client's samples as its local test set: (train_idx, test_idx).

    Given one index array, returns one pair; given a list of them (one per client), a list of pairs.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.local_test_fraction: must be in [0, 1), got {fraction}")
    if isinstance(indices, np.ndarray) and indices.ndim == 1:
        return _split_one(indices, fraction, rng)
    return [_split_one(np.asarray(p), fraction, rng) for p in indices]
