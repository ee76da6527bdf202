"""Whole HeteroFL / FedRolex / Federated Dropout runs on tiny synthetic federations."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from fedslim.algorithms.submodel import state_shapes
from fedslim.codecs import pack_exact
from fedslim.config import validate
from fedslim.engine.run import Runner
from fedslim.tables import fmt_bytes


def _cfg(tmp_path: Path, name: str, algo: str, params: dict, **over: dict) -> dict:
    os.environ.pop("FEDSLIM_DATA", None)
    cfg = {
        "name": name, "seed": 5, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "num_clients": 8,
                 "partition": {"kind": "pathological", "classes_per_client": 2},
                 "options": {"num_samples": 320, "test_samples": 100, "num_classes": 5, "shape": [1, 8, 8],
                             "separation": 0.6}},
        "model": {"name": "heterofl_cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                                 "weight_decay": 5e-4}},
        "federation": {"rounds": 2, "participation": 0.5},
        "algorithm": {"name": algo, "params": params},
        "engine": {"progress": False},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _run(cfg: dict) -> tuple[Runner, dict]:
    r = Runner(validate(copy.deepcopy(cfg)), out=open(os.devnull, "w"))  # noqa: SIM115
    return r, r.run()


def _rows(r: Runner) -> list[dict]:
    return [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rate_one_heterofl_is_unweighted_fedavg_exactly(tmp_path):
    """Every client at rate 1, no static BN / Scaler / masking / label rows: the same numbers as
    FedAvg with plain (unweighted) averaging, down to the bits of every tensor (BN buffers and the
    integer batch counters included)."""
    fed, _ = _run(_cfg(tmp_path, "fedavg", "fedavg", {}, federation={"weighted": False}))
    het, _ = _run(_cfg(tmp_path, "heterofl", "heterofl", {
        "model_split": "a1", "static_bn": False, "scaler": False, "masked_loss": False, "label_rows": False}))
    a, b = fed.algo.state, het.algo.state
    assert set(a) == set(b) and any("running_mean" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ev_f = [row["eval"]["global"] for row in _rows(fed)]
    ev_h = [row["eval"]["a"] for row in _rows(het)]
    assert ev_f == ev_h and len(ev_f) == 2
    # Not vacuous: the model moved, and HeteroFL's own defaults (masked loss, label rows) differ.
    init = het.ctx.init_state(het.algo.global_spec)
    assert not torch.equal(init["blocks.0.weight"], b["blocks.0.weight"])
    masked, _ = _run(_cfg(tmp_path, "masked", "heterofl", {
        "model_split": "a1", "static_bn": False, "scaler": False, "label_rows": False}))
    assert not torch.equal(masked.algo.state["blocks.0.weight"], b["blocks.0.weight"])


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "fed_dropout"])
def test_a_e_noniid_run_evaluates_every_level_with_queried_bn_and_local_accuracy(tmp_path, algo):
    cfg = _cfg(tmp_path, algo, algo, {"model_split": "a1-e1"}, data={"local_test_fraction": 0.2},
               eval={"local": True})
    r, s = _run(cfg)
    assert set(s["final"]) == {"a", "e"}
    assert all(0.0 <= s["final"][x]["acc"] <= 1.0 for x in "ae")
    assert s["levels"]["a"]["params"] > 50 * s["levels"]["e"]["params"]
    assert s["models"]["e"]["params"] == s["levels"]["e"]["params"]
    assert s["local"]["all"]["n"] > 0
    # local metrics per level too (a model_split's levels are not the device tiers, of which there is one)
    assert set(s["local"]) == {"all", "a", "e"}
    loc = s["local"]
    assert loc["a"]["clients"] + loc["e"]["clients"] == loc["all"]["clients"] == 8
    assert loc["a"]["n"] + loc["e"]["n"] == loc["all"]["n"]
    assert loc["all"]["acc"] == pytest.approx((loc["a"]["acc"] * loc["a"]["n"] + loc["e"]["acc"] * loc["e"]["n"])
                                              / loc["all"]["n"])
    assert s["bn_query"]["queries"] == 2 and s["bn_query"]["bytes_down"] > 0 and s["bn_query"]["bytes_up"] > 0
    rows = _rows(r)
    assert all(row["bn_query"]["clients"] == 8 for row in rows)
    # Downlink bytes are those of each client's own sub-model (its exact encoded payload).
    for row in rows:
        for comm in row["comm"]:
            for c, nbytes in comm["bytes_down"].items():
                spec = r.algo.train_specs[r.algo.level_of(comm["round"], int(c))]
                zeros = {k: torch.zeros(v) for k, v in state_shapes(spec).items()}
                assert nbytes == len(pack_exact(zeros))
    sizes = {r.algo.level_of(1, int(c)): n for c, n in rows[0]["comm"][0]["bytes_down"].items()}
    assert sizes["a"] > 50 * sizes["e"]


def test_evaluated_bn_statistics_are_pooled_client_statistics(tmp_path):
    """The installed statistics of the first BN layer are those of the clients' local training data
    (union of their shards), not of the central training set or the test set."""
    cfg = _cfg(tmp_path, "bn", "heterofl", {"model_split": "a1-e1"}, data={"local_test_fraction": 0.3},
               federation={"rounds": 1})
    r, _ = _run(cfg)
    spec, state = r.algo.eval_targets(1)["a"]
    x = torch.cat([r.ctx.store.get(c).x for c in range(8)])
    w, b = state["blocks.0.weight"], state["blocks.0.bias"]
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, w, b, padding=1).double()
    torch.testing.assert_close(state["blocks.2.running_mean"].double(), y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    everything = torch.nn.functional.conv2d(r.ctx.bundle.train.x, w, b, padding=1).double().mean((0, 2, 3))
    assert not torch.allclose(state["blocks.2.running_mean"].double(), everything, rtol=1e-4, atol=1e-5)
    # And the query followed the cohort setting: 'cohort' asks only the round's clients.
    cfg = _cfg(tmp_path, "bn2", "heterofl", {"model_split": "a1-e1", "bn_query_clients": "cohort"},
               federation={"rounds": 1})
    r, _ = _run(cfg)
    assert _rows(r)[0]["bn_query"]["clients"] == 4


def test_eval_local_without_a_local_split_is_a_config_error(tmp_path):
    from fedslim.config import ConfigError

    cfg = _cfg(tmp_path, "x", "heterofl", {"model_split": "a1-e1"}, eval={"local": True})
    with pytest.raises(ConfigError, match="eval.local: .*local_test_fraction"):
        validate(cfg)


@pytest.mark.parametrize("algo", ["heterofl", "fed_dropout"])
def test_printed_summary_lists_each_levels_sub_model_and_the_bn_query_traffic(tmp_path, algo):
    """The table's bytes line is training traffic only; the static-BN query (here far larger) and each
    level's sub-model size are printed under it, and the summary's per-level sub-model bytes are what
    each client of that level was sent."""
    import io

    buf = io.StringIO()
    cfg = validate(_cfg(tmp_path, algo, algo, {"model_split": "a1-b1-e2"}))
    r = Runner(cfg, out=buf)
    s = r.run()
    levels = s["levels"]
    sizes = [levels[x]["submodel_bytes"] for x in "abe"]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 50 * sizes[2]
    for comm in _rows(r)[-1]["comm"]:
        for c, nbytes in comm["bytes_down"].items():
            assert nbytes == levels[r.algo.level_of(comm["round"], int(c))]["submodel_bytes"]
    text = buf.getvalue()
    q = s["bn_query"]
    assert q["bytes_down"] > s["bytes_down"]
    assert (f"static BN query (not in the bytes above): 2 queries, down {fmt_bytes(q['bytes_down'])}, "
            f"up {fmt_bytes(q['bytes_up'])}") in text
    for x, n in zip("abe", [2, 2, 4], strict=True):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  {x} "))
        assert fmt_bytes(levels[x]["submodel_bytes"]) in line and line.endswith(f"clients {n}")
