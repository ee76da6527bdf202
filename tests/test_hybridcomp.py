"""HybridCompFL: capable-only training, a ladder whose sizes are its files' sizes, budgeted deployment,
unserved tiers, fine-tuning with the mask kept, constrained devices joining later."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedslim.algorithms.hybridcomp import HybridCompParams, activation_bytes, ladder_rungs
from fedslim.codecs import ExactCodec, Pipeline, compress_state
from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner, sample_cohort
from fedslim.engine.task import ModelSpec

MID_BUDGET = 40_000
TIERS = [{"name": "big", "share": 0.4, "capable": True},
         {"name": "mid", "share": 0.4, "capable": False, "model_bytes": MID_BUDGET},
         {"name": "tiny", "share": 0.2, "capable": False, "model_bytes": 300}]


def _cfg(tiny_cfg: dict, name: str = "hc", **params: object) -> dict:
    cfg = dict(tiny_cfg, name=name)
    cfg["data"] = {**tiny_cfg["data"], "num_clients": 10}
    cfg["model"] = {"name": "mlp", "options": {"norm": "none"}}
    cfg["federation"] = {"rounds": 3, "participation": 0.5}
    cfg["algorithm"] = {"name": "hybridcomp", "params": {"amounts": [0.3, 0.6, 0.9], **params}}
    cfg["devices"] = {"tiers": TIERS}
    return cfg


@pytest.fixture
def plain_run(tiny_cfg: dict) -> tuple[dict, Path]:
    summary = Runner(validate(_cfg(tiny_cfg))).run()
    return summary, Path(tiny_cfg["output_dir"]) / "hc"


def _ladder(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "ladder.csv").open()))


def test_only_capable_devices_train(plain_run: tuple[dict, Path]) -> None:
    _, run = plain_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    capable = set(range(4))  # fixed assignment: the first 40 % of the clients are tier 'big'
    for r in rows:
        for c in r["comm"]:
            assert set(map(int, c["bytes_up"])) <= capable
            assert len(c["bytes_up"]) == 2  # participation 0.5 of the 4 capable devices


def test_ladder_sizes_are_file_sizes_and_sparsity_is_measured(plain_run: tuple[dict, Path]) -> None:
    _, run = plain_run
    ladder = _ladder(run)
    assert [r["rung"] for r in ladder] == [r.name for r in ladder_rungs(HybridCompParams(amounts=[0.3, 0.6, 0.9]))]
    for r in ladder:
        blob = (run / r["file"]).read_bytes()
        assert len(blob) == int(r["bytes"]) == int(r["file_bytes"])
        # decode the file as a device would and count its zeros independently of the codec's stats
        state = (ExactCodec() if r["order"] == "dense" else Pipeline([])).decode(blob, None)
        weights = [t for k, t in state.items() if k.endswith("weight")]
        zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
        assert zeros == pytest.approx(float(r["measured_sparsity"]), abs=1e-9)
        nominal, rounding = float(r["nominal_sparsity"]), float(r["rounding_zero_share"])
        assert nominal - 0.01 <= zeros <= nominal + rounding + 0.01
        assert float(r["ratio_vs_float32"]) == pytest.approx(int(r["float32_bytes"]) / len(blob))
    by = {r["rung"]: r for r in ladder}
    assert float(by["dense"]["ratio_vs_float32"]) == 1.0
    assert float(by["int8"]["ratio_vs_float32"]) > 3.5
    # pruned zeros are encoded: more pruning, fewer bytes, beyond what int8 alone gives
    sizes = [int(by[f"prune{a}_int8"]["bytes"]) for a in ("0.3", "0.6", "0.9")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < int(by["int8"]["bytes"])
    assert float(by["prune0.6_int8"]["ratio_vs_float32"]) > 5


def test_each_tier_gets_the_best_rung_within_budget(plain_run: tuple[dict, Path]) -> None:
    summary, run = plain_run
    ladder = _ladder(run)
    fits = [r for r in ladder if int(r["bytes"]) <= MID_BUDGET]
    best = max(float(r["f1_weighted"]) for r in fits)
    mid = summary["tiers"]["mid"]
    chosen = next(r for r in ladder if r["rung"] == mid["rung"])
    assert int(chosen["bytes"]) <= MID_BUDGET and float(chosen["f1_weighted"]) == best
    assert mid["served"] == mid["devices"] == 4 and mid["local"]["n"] > 0
    devices = list(csv.DictReader((run / "devices.csv").open()))
    sent = [int(d["bytes_down"]) for d in devices if d["tier"] == "mid"]
    assert sent == [int(chosen["bytes"])] * 4
    assert summary["deployment"]["bytes_down"] == sum(sent)


def test_infeasible_budget_is_reported_unserved(plain_run: tuple[dict, Path]) -> None:
    summary, run = plain_run
    tiny = summary["tiers"]["tiny"]
    assert tiny["served"] == 0 and tiny["rung"] is None and tiny["local"] is None
    smallest = min(int(r["bytes"]) for r in _ladder(run))
    note = next(n for n in summary["notes"] if "'tiny'" in n)
    assert "unserved" in note and "300 B" in note and f"{smallest:,} B" in note
    devices = [d for d in csv.DictReader((run / "devices.csv").open()) if d["tier"] == "tiny"]
    assert devices and all(d["served"] == "False" and not d["acc"] for d in devices)


def test_finetuning_keeps_the_mask(tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "ft", finetune_epochs=2, write_rungs=False)
    cfg["data"]["local_test_fraction"] = 0.25
    summary = Runner(validate(cfg)).run()
    run = Path(tiny_cfg["output_dir"]) / "ft"
    ladder = {r["rung"]: r for r in _ladder(run)}
    mid = summary["tiers"]["mid"]
    assert mid["local_finetuned"]["n"] == mid["local"]["n"] > 0
    for d in csv.DictReader((run / "devices.csv").open()):
        if d["tier"] == "mid":
            before = float(ladder[d["rung"]]["measured_sparsity"])
            # the pruned positions stayed zero through local training (re-quantizing may only add zeros)
            assert float(d["sparsity_after_finetune"]) >= before - 1e-9
            assert d["acc_finetuned"]


def test_constrained_devices_join_with_their_compressed_model(tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "join", constrained_join=True, join_round=1, write_rungs=False)
    cfg["data"]["local_test_fraction"] = 0.25
    cfg["federation"]["participation"] = 1.0
    summary = Runner(validate(cfg)).run()
    rows = [json.loads(line) for line in (Path(tiny_cfg["output_dir"]) / "join" / "metrics.jsonl").open()]
    rung = rows[0]["join_rungs"]["mid"]
    assert summary["join_rungs"] == {"mid": rung}
    first, later = rows[0]["comm"][0], rows[1]["comm"][0]
    assert set(map(int, first["bytes_up"])) == set(range(4))
    assert set(map(int, later["bytes_up"])) == set(range(8))  # the unserved tier never joins
    # a constrained device downloads its rung of the current global model, not the float32 model
    mid_down = {later["bytes_down"][str(c)] for c in range(4, 8)}
    assert len(mid_down) == 1 and mid_down.pop() < min(later["bytes_down"][str(c)] for c in range(4)) / 3
    assert "prune" in rows[1]["codec_down"]["codec"] and rows[1]["codec_down"]["measured_sparsity"] > 0


def test_sampling_among_eligible_clients_only() -> None:
    pool = [3, 8, 11, 20, 31, 40]
    picked = sample_cohort(7, 2, 50, 0.5, pool)
    assert picked == sample_cohort(7, 2, 50, 0.5, pool) and len(picked) == 3 and set(picked) <= set(pool)
    assert sample_cohort(7, 2, 50, 1.0, pool) == pool
    assert sample_cohort(7, 2, 50, 0.5, []) == []
    assert {tuple(sample_cohort(7, r, 50, 0.5, pool)) for r in range(1, 8)} != {tuple(picked)}


def test_activation_estimate_is_the_widest_layer_pair() -> None:
    for width in (1.0, 0.5):
        spec = ModelSpec.make("mlp", 4, (1, 8, 8), width, norm="none")
        hidden = int(200 * width)
        assert activation_bytes(spec) == 4 * 2 * hidden  # a hidden layer's input + output, float32


@pytest.mark.parametrize(("change", "needle"), [
    ({"devices": {"tiers": [{"name": "a", "capable": False, "model_bytes": 10}]}}, "devices.tiers: "),
    ({"devices": {"tiers": [{"name": "a"}, {"name": "b", "capable": False}]}}, "devices.tiers.1.model_bytes"),
    ({"devices": {"tiers": TIERS, "assignment": "dynamic"}}, "devices.assignment"),
    ({"algorithm": {"name": "hybridcomp", "params": {"finetune_epochs": 1}}}, "finetune_epochs"),
    ({"algorithm": {"name": "hybridcomp", "params": {"amounts": [0.5, 1.0]}}}, "algorithm.params.amounts"),
    # one round: the default join_round is the last one, so constrained devices would never join
    ({"algorithm": {"name": "hybridcomp", "params": {"constrained_join": True}},
      "data": {"dataset": "synthetic", "num_clients": 10, "local_test_fraction": 0.2},
      "federation": {"rounds": 1}}, "algorithm.params.constrained_join: constrained devices join after join_round"),
    # a capable share too small for 10 devices: apportioned 0 of them, so nobody would train
    ({"devices": {"tiers": [{"name": "a", "share": 0.01}, {"name": "b", "share": 0.99, "capable": False,
                                                          "model_bytes": 10}]}}, "devices.tiers.0.share"),
])
def test_config_errors(tiny_cfg: dict, change: dict, needle: str) -> None:
    cfg = {**_cfg(tiny_cfg), **change}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg)


def test_memory_budget_counts_activations(tiny_cfg: dict) -> None:
    spec = ModelSpec.make("mlp", 4, (1, 8, 8), 1.0, norm="none")
    act = activation_bytes(spec)
    # int8 is coded densely whatever the values, so any initialisation gives the run's int8 size
    int8_bytes = len(compress_state(spec.build().state_dict(), [{"name": "int8"}])[0])
    budget = int8_bytes + act // 2  # int8 fits as a file, but not with its activations
    cfg = _cfg(tiny_cfg, "mem", budget="memory", write_rungs=False)
    cfg["devices"] = {"tiers": [TIERS[0], {"name": "mid", "share": 0.6, "capable": False,
                                           "memory_mb": budget / 1e6}]}
    summary = Runner(validate(cfg)).run()
    ladder = {r["rung"]: r for r in summary["ladder"]}
    assert ladder["int8"]["bytes"] == int8_bytes
    assert all(r["memory_bytes"] == r["bytes"] + act for r in ladder.values())
    mid = summary["tiers"]["mid"]
    assert mid["rung"] not in (None, "dense", "int8")
    assert ladder[mid["rung"]]["memory_bytes"] <= budget


def test_a_capable_tier_of_one_device_is_accepted(tiny_cfg: dict) -> None:
    # 10 % of 10 devices is one capable device: enough to train, so no error (the bound is not too strict)
    cfg = {**_cfg(tiny_cfg), "devices": {"tiers": [{"name": "a", "share": 0.1},
                                                   {"name": "b", "share": 0.9, "capable": False, "model_bytes": 10}]}}
    assert validate(cfg).devices.tiers[0].share == 0.1
    with pytest.raises(ConfigError, match=r"get 0 of the 10 devices"):
        validate({**cfg, "devices": {"tiers": [{"name": "a", "share": 0.04}, *cfg["devices"]["tiers"][1:]]}})


def test_unserved_because_of_min_metric_does_not_blame_the_budget(tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "minm", min_metric=1.0, write_rungs=False)
    cfg["devices"] = {"tiers": [TIERS[0], {"name": "mid", "share": 0.6, "capable": False, "model_bytes": 10**9}]}
    summary = Runner(validate(cfg)).run()
    assert max(r["f1_weighted"] for r in summary["ladder"]) < 1.0  # no rung is perfect on this data
    assert summary["tiers"]["mid"]["rung"] is None
    note = next(n for n in summary["notes"] if "'mid'" in n)
    assert "no rung reaches algorithm.params.min_metric (f1_weighted >= 1)" in note
    assert "below the smallest rung" not in note


def test_memory_budget_table_and_early_note(tiny_cfg: dict) -> None:
    spec = ModelSpec.make("mlp", 4, (1, 8, 8), 1.0, norm="none")
    act = activation_bytes(spec)
    cfg = _cfg(tiny_cfg, "mem2", budget="memory", write_rungs=False)
    cfg["devices"] = {"tiers": [TIERS[0], {"name": "mid", "share": 0.4, "capable": False, "memory_mb": 1.0},
                                {"name": "nano", "share": 0.2, "capable": False, "memory_mb": (act - 1) / 1e6}]}
    runner = Runner(validate(cfg))
    summary = runner.run()
    # the activations alone exceed nano's budget: said before training, and before the closing note
    early = [i for i, n in enumerate(summary["notes"]) if "'nano' can never be served" in n]
    late = [i for i, n in enumerate(summary["notes"]) if "'nano' (2 devices) is unserved" in n]
    assert early and late and early[0] < late[0]
    assert f"({act - 1:,} B)" in summary["notes"][early[0]] and f"({act:,} B" in summary["notes"][early[0]]
    mid = summary["tiers"]["mid"]
    assert mid["rung_memory_bytes"] == mid["rung_bytes"] + act <= mid["budget"]
    # the printed table shows the memory the budget is compared with, beside the budget
    lines = runner.algo.describe_summary(summary)
    header = next(x for x in lines if x.startswith("tier "))
    assert header.split()[7:9] == ["memory", "budget"]
    row = next(x for x in lines if x.startswith("mid ")).split()
    assert row[7:9] == [f"{mid['rung_memory_bytes']:,}", f"{mid['budget']:,.0f}"]
    assert summary["tiers"]["nano"]["rung_memory_bytes"] is None


def test_model_bytes_table_has_no_memory_column(plain_run: tuple[dict, Path]) -> None:
    summary, _ = plain_run
    from fedslim.algorithms.hybridcomp import HybridCompFL

    lines = HybridCompFL.describe_summary(None, summary)  # type: ignore[arg-type]  # uses only the summary
    header = next(x for x in lines if x.startswith("tier "))
    assert "memory" not in header and header.split()[7] == "budget"


def test_resumed_join_run_matches_uninterrupted(tiny_cfg: dict, kill_run: Callable[[dict, int], None]) -> None:
    def cfg(name: str) -> dict:
        c = _cfg(tiny_cfg, name, constrained_join=True, join_round=1, finetune_epochs=1)
        c["data"]["local_test_fraction"] = 0.25
        return c

    full = Runner(validate(cfg("full"))).run()

    kill_run(cfg("part"), 3)  # killed in round 3: rounds 1 and 2 are recorded (the tiers joined after 1)
    out = Path(tiny_cfg["output_dir"])
    assert len((out / "part" / "metrics.jsonl").read_text().splitlines()) == 2
    part = Runner(validate(cfg("part")), resume=True).run()
    assert (out / "full" / "metrics.jsonl").read_bytes() == (out / "part" / "metrics.jsonl").read_bytes()
    for f in ("ladder.csv", "devices.csv"):
        assert (out / "full" / f).read_bytes() == (out / "part" / f).read_bytes()
    assert part["tiers"] == full["tiers"] and part["join_rungs"] == full["join_rungs"] != {}
    assert part["notes"] == full["notes"]
    assert any("after round 1 constrained tiers join" in n for n in part["notes"])


def test_report_shows_the_deployment_beside_training_downlink(plain_run: tuple[dict, Path], tmp_path: Path) -> None:
    from fedslim.report import report
    from fedslim.tables import fmt_bytes

    summary, run = plain_run
    d = summary["deployment"]
    assert d["bytes_down"] > 0
    text = report([str(run)], str(tmp_path / "rep"))
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{run.name}: plus"))
    assert f"plus {fmt_bytes(d['bytes_down'])} deployed once" in line
    assert f"({d['served']} devices served, {d['unserved']} unserved)" in line
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    # the table's 'down' stays the training rounds' bytes
    row = next(ln for ln in text.splitlines() if ln.startswith(run.name + " "))
    assert fmt_bytes(rows[-1]["cum_bytes_down"]) in row


def test_printed_local_rows_say_which_model_each_scores(tiny_cfg: dict) -> None:
    import io

    cfg = _cfg(tiny_cfg, "loc", write_rungs=False)
    cfg["data"]["local_test_fraction"] = 0.25
    cfg["eval"] = {"local": True}
    out = io.StringIO()
    summary = Runner(validate(cfg), out=out).run()
    text = out.getvalue()
    # the table's local/mid row (global model) and the tier table's 'local acc' (served rung) differ in
    # what they measure, and the printout says so
    assert "local/mid" in text and summary["local"]["mid"]["n"] == summary["tiers"]["mid"]["local"]["n"] > 0
    assert ("local acc here: each device's served rung; the local/<tier> rows of the table above score the "
            "global (dense) model on the same tiers' local test splits") in text
