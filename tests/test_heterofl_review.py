"""Review of HeteroFL / FedRolex / Federated Dropout against the papers and the reference code
(github.com/diaoenmao/HeteroFL-..., github.com/AIoT-MLSys-Lab/FedRolex): index sets, sum-and-count
against the reference's parameter averaging, Scaler and static BN per level, and where a rate-1 run
equals FedAvg."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from fedslim.algorithms.aggregate import mean_delta
from fedslim.algorithms.submodel import Contribution, combine
from fedslim.config import validate
from fedslim.engine.run import Runner
from fedslim.engine.task import ClientResult
from fedslim.models.layers import Scaler


def _cfg(tmp_path: Path, name: str, algo: str, params: dict, *, partition: dict | None = None,
         clients: int = 9, width: float = 0.25, shape: tuple[int, ...] = (1, 8, 8), **over: dict) -> dict:
    cfg = {
        "name": name, "seed": 4, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "num_clients": clients,
                 "partition": partition or {"kind": "pathological", "classes_per_client": 2},
                 "options": {"num_samples": 40 * clients, "test_samples": 100, "num_classes": 5,
                             "shape": list(shape), "separation": 0.6}},
        "model": {"name": "heterofl_cnn", "width": width},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "federation": {"rounds": 2, "participation": 0.5},
        "algorithm": {"name": algo, "params": params},
        "engine": {"progress": False},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _built(cfg: dict) -> Runner:
    os.environ.pop("FEDSLIM_DATA", None)
    r = Runner(validate(copy.deepcopy(cfg)), out=open(os.devnull, "w"))  # noqa: SIM115
    r._build()
    r.algo.setup()
    return r


def _run(cfg: dict) -> Runner:
    os.environ.pop("FEDSLIM_DATA", None)
    r = Runner(validate(copy.deepcopy(cfg)), out=open(os.devnull, "w"))  # noqa: SIM115
    r.run()
    return r


# ---------------------------------------------------------------------------------------------
# index sets


def test_heterofl_prefix_sizes_follow_the_references_ceil_rule_and_keep_input_and_classes(tmp_path):
    """Every hidden axis of level r holds ceil(r / global rate * n) of n entries (the reference's
    ``int(np.ceil(output_size * scaler_rate))``), the image channels and the classifier's rows stay
    whole, the classifier's inputs follow the last hidden layer."""
    r = _built(_cfg(tmp_path, "p", "heterofl", {"model_split": "a1-b1-c1-d1-e1"}, shape=(1, 28, 28), width=1.0))
    algo = r.algo
    for label, rate in algo.level_rates.items():
        plan = algo.prefix_plans[label]
        for key, shape in algo.layout.shapes.items():
            want = list(shape)
            if key in algo.layout.output_keys:
                if len(shape) == 2:
                    want[1] = math.ceil(rate * shape[1])
            else:
                want[0] = math.ceil(rate * shape[0])
                if len(shape) == 4 and key != "blocks.0.weight":
                    want[1] = math.ceil(rate * shape[1])
            assert list(plan[key]) == want, (label, key)
    assert algo.prefix_plans["e"]["blocks.0.weight"] == (4, 1, 3, 3)
    assert algo.prefix_plans["e"]["blocks.21.weight"] == (5, 32)


def test_fedrolex_window_wraps_with_period_n_and_trains_every_channel_equally(tmp_path):
    r = _built(_cfg(tmp_path, "r", "fedrolex", {"model_split": "a1-b1-e1"}, width=1.0))
    algo = r.algo
    key = "blocks.5.weight"  # second conv: 128 channels at width 1
    n = algo.layout.sizes[1]

    def window(rnd: int, label: str) -> torch.Tensor:
        return algo.index_plan(rnd, 3, label)[key][0]

    k = len(window(1, "e"))
    assert (n, k) == (128, 8)
    assert window(1, "e").tolist() == list(range(8))  # the reference's first round: no roll
    assert window(n, "e").tolist() == [127, 0, 1, 2, 3, 4, 5, 6]  # wraps around
    assert torch.equal(window(n + 1, "e"), window(1, "e"))  # one full turn every n rounds
    used = torch.zeros(n)
    for rnd in range(1, n + 1):
        used[window(rnd, "e")] += 1
    assert bool((used == k).all())  # every channel trained by level e equally often
    for rnd in (1, 70, 125):  # levels share the window's start: the smaller window lies in the larger
        assert set(window(rnd, "e").tolist()) <= set(window(rnd, "b").tolist())
        assert window(rnd, "b")[0] == (rnd - 1) % n


def test_fed_dropout_draws_come_from_the_seed_alone(tmp_path):
    cfg = _cfg(tmp_path, "d", "fed_dropout", {"model_split": "a1-e1"})
    a, b = _built(cfg), _built(cfg)
    other = _built({**cfg, "seed": 5})
    key = "blocks.10.weight"
    pa, pb, po = (x.algo.index_plan(2, 7, "e")[key][0] for x in (a, b, other))
    assert torch.equal(pa, pb) and not torch.equal(pa, po)
    n = a.algo.layout.sizes[2]
    used = torch.zeros(n)
    for rnd in range(1, 201):
        for c in range(5, 10):
            idx = a.algo.index_plan(rnd, c, "e")[key][0]
            assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
            used[idx] += 1
    expect = 1000 * len(pa) / n
    assert 0.6 * expect < float(used.min()) and float(used.max()) < 1.4 * expect  # uniform draws


# ---------------------------------------------------------------------------------------------
# sum-and-count


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "fed_dropout"])
def test_aggregate_equals_the_reference_combine_of_client_parameters(tmp_path, algo):
    """The reference averages the *parameters* clients return over the clients holding each element
    (output layer: only rows of the client's labels) and keeps the rest; here clients return deltas.
    Same result, for a mixed cohort of three levels."""
    r = _built(_cfg(tmp_path, "c", algo, {"model_split": "a1-b1-e1"}))
    algo_ = r.algo
    cohort = [0, 3, 7, 8]  # levels a, b, e, e (a: 0-2, b: 3-5, e: 6-8); nobody holds class 4
    tasks = algo_.plan(3, cohort)
    before = {k: v.clone() for k, v in algo_.state.items()}
    gen = torch.Generator().manual_seed(0)
    results = [ClientResult(t.client, 3, {k: torch.randn(v.shape, generator=gen) for k, v in t.state.items()}, 10)
               for t in tasks]
    expect = {}
    for key, old in before.items():
        total = torch.zeros(old.shape, dtype=torch.float64)
        count = torch.zeros(old.shape, dtype=torch.float64)
        for t, res in zip(tasks, results, strict=True):
            idx = [torch.arange(a) if isinstance(a, int) else a for a in algo_._pending[t.client][1][key]]
            local = (t.state[key] + res.delta[key]).double()
            if key in algo_.layout.output_keys:
                labels = torch.nonzero(r.ctx.store.client_labels(t.client)).flatten()
                idx[0], local = idx[0][labels], local[labels]
            mesh = torch.meshgrid(*idx, indexing="ij")
            total[mesh] += local
            count[mesh] += 1
        new = old.double().clone()
        held = count > 0
        new[held] = total[held] / count[held]
        expect[key] = new
    algo_.aggregate(3, tasks, results)
    for key, want in expect.items():
        torch.testing.assert_close(algo_.state[key].double(), want, rtol=0, atol=1e-6)
    head = algo_.layout.output_keys[1]
    kept = expect[head] == before[head].double()
    assert bool(kept.any())  # classes no cohort client holds keep their old rows, exactly
    assert torch.equal(algo_.state[head][kept], before[head][kept])


def test_weighted_combine_is_fedavgs_weighted_mean_bit_for_bit():
    """Weights by sample count: each term is delta * (w / total) with a true division, the arithmetic
    of FedAvg's mean_delta. (It was delta * (total^-1 * w), which differs in the last bit.)"""
    gen = torch.Generator().manual_seed(0)
    counts = [43, 37, 42, 38]
    results = [ClientResult(i, 1, {"w": torch.randn(4096, generator=gen)}, n) for i, n in enumerate(counts)]
    state = {"w": torch.zeros(4096)}
    got = combine(state, [Contribution(r.delta, {"w": (4096,)}, float(r.num_samples)) for r in results])
    assert torch.equal(got["w"], mean_delta(results, weighted=True)["w"])


# ---------------------------------------------------------------------------------------------
# Scaler, static BN


def test_scaler_is_rate_over_global_rate_in_training_only_and_bn_is_static_in_training(tmp_path):
    r = _built(_cfg(tmp_path, "s", "heterofl", {"model_split": "b1-c1-e1"}, width=1.0))
    algo = r.algo
    assert algo.global_rate == 0.5
    for label, want in {"b": 1.0, "c": 0.5, "e": 0.125}.items():
        train, ev = algo.train_specs[label].build(), algo.eval_specs[label].build()
        assert {m.rate for m in train.modules() if isinstance(m, Scaler)} == {want}
        assert {m.rate for m in ev.modules() if isinstance(m, Scaler)} == {1.0}
        bns = [m for m in train.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.track_running_stats for m in bns)
        assert all(m.track_running_stats for m in ev.modules() if isinstance(m, torch.nn.BatchNorm2d))
    scaler = Scaler(0.125)
    x = torch.ones(3)
    assert scaler.train()(x).tolist() == [8.0] * 3 and scaler.eval()(x).tolist() == [1.0] * 3


# ---------------------------------------------------------------------------------------------
# rate 1 = FedAvg


def test_rate_one_weighted_heterofl_is_weighted_fedavg_exactly(tmp_path):
    fed = _run(_cfg(tmp_path, "fedavg", "fedavg", {}, clients=8, federation={"weighted": True}))
    het = _run(_cfg(tmp_path, "het", "heterofl", {"model_split": "a1", "static_bn": False, "masked_loss": False,
                                                   "label_rows": False, "weighted": True}, clients=8))
    a, b = fed.algo.state, het.algo.state
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rate_one_heterofl_on_iid_data_needs_only_static_bn_off_to_equal_fedavg(tmp_path):
    """On IID data the defaults mask nothing (masked_loss auto is off, every client holds every label)
    and the Scaler of rate 1 is the identity: only static BN separates HeteroFL from FedAvg."""
    iid = {"kind": "iid"}
    fed = _run(_cfg(tmp_path, "fedavg", "fedavg", {}, clients=8, partition=iid, federation={"weighted": False}))
    het = _run(_cfg(tmp_path, "het", "heterofl", {"model_split": "a1", "static_bn": False}, clients=8,
                    partition=iid))
    for k in fed.algo.state:
        assert torch.equal(fed.algo.state[k], het.algo.state[k]), k


def test_static_bn_trains_exactly_as_fedavg_without_running_statistics(tmp_path):
    """Static BN changes training only by dropping the running statistics: a rate-1 run with static BN
    on trains the same model as FedAvg with model.options.track_running_stats: false (evaluation
    differs: HeteroFL installs queried statistics, while such a FedAvg model normalises with test-batch
    statistics)."""
    fed = _run(_cfg(tmp_path, "fedavg", "fedavg", {}, clients=8, federation={"weighted": False},
                    model={"options": {"track_running_stats": False}}))
    het = _run(_cfg(tmp_path, "het", "heterofl", {"model_split": "a1", "masked_loss": False, "label_rows": False},
                    clients=8))
    a, b = fed.algo.state, het.algo.state
    assert set(a) == set(b) and not any("running" in k for k in b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_single_narrow_level_is_fedavg_at_that_width(tmp_path):
    """'e1' trains a global model of width model.width / 16 (the reference's global rate is the first
    letter's): the same as FedAvg with that model.width."""
    fed = _run(_cfg(tmp_path, "fedavg", "fedavg", {}, clients=8, width=0.25 / 16, federation={"weighted": False}))
    het = _run(_cfg(tmp_path, "het", "heterofl", {"model_split": "e1", "static_bn": False, "masked_loss": False,
                                                   "label_rows": False}, clients=8))
    for k in fed.algo.state:
        assert torch.equal(fed.algo.state[k], het.algo.state[k]), k
