"""DAC: the exact cost model, the gated MobileNet-V2, the search procedure, extraction within the budgets,
aggregation over the architectures, whole runs (phases, summary, resume, backends) and config errors.

Every run here is MobileNet-V2 at model.width 0.125 on the embedded digits (8x8, no download), so the
profiler's cache (fedslim.models.profile) is shared: the cost model is measured once per session."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from fedslim.algorithms.dac import CostModel
from fedslim.algorithms.submodel import ChannelLayout, extract
from fedslim.codecs import pack_exact
from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner
from fedslim.engine.task import ModelSpec
from fedslim.models import build_model
from fedslim.models.mobilenet import NUM_EXPANDING, ChannelGate, block_plan
from fedslim.models.profile import profile_spec

WIDTH = 0.125
SHAPE = (1, 8, 8)
# DAC's global (supernet) spec for the runs below: static BN, no Scaler.
SUPERNET = ModelSpec.make("mobilenetv2", 10, SHAPE, WIDTH, track_running_stats=False, scaler_rate=1.0)
EXPANDING = [i for i, (cin, hid, _, _) in enumerate(block_plan()) if hid != cin]


def _cfg(out: Path, name: str, params: dict | None = None, **over: dict) -> dict:
    os.environ.pop("FEDSLIM_DATA", None)
    cfg = {
        "name": name, "seed": 3, "output_dir": str(out),
        "data": {"dataset": "digits", "num_clients": 6, "train_subset": 240, "test_subset": 60},
        "model": {"name": "mobilenetv2", "width": WIDTH},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "federation": {"rounds": 2, "participation": 1.0},
        "devices": {"tiers": [{"name": "big", "width": 1.0}, {"name": "small", "width": 0.5}]},
        "algorithm": {"name": "dac", "params": {"search_rounds": 1, **(params or {})}},
        # One torch thread everywhere: serial and process runs then agree bit for bit.
        "engine": {"progress": False, "backend": "serial", "threads": 1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _runner(cfg: dict, **kw: object) -> Runner:
    return Runner(validate(copy.deepcopy(cfg)), out=open(os.devnull, "w"), **kw)  # noqa: SIM115


def _built(cfg: dict) -> Runner:
    """A runner with its DAC set up (no round run, nothing written)."""
    r = _runner(cfg)
    r._build()  # noqa: SLF001
    r.algo.setup()
    return r


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _probs(algo, label: str) -> list[torch.Tensor]:
    return [torch.sigmoid(algo.gates[label][k].double()) for k in algo.gate_keys]


def _set_gates(algo, label: str, base: float, seed: int) -> None:
    """Logits ``base`` + U(0, 1), distinct everywhere, so that every order of gates is strict."""
    g = torch.Generator().manual_seed(seed)
    algo.gates[label] = {k: base + torch.rand(algo.gates[label][k].shape, generator=g) for k in algo.gate_keys}


def _fits(algo, hidden: list[int], budget: dict) -> bool:
    return algo.cost.macs(hidden) <= budget["macs"] and algo.cost.params(hidden) <= budget["params"]


def _fits_with_one_more(algo, hidden: list[int], block: int, budget: dict) -> bool:
    return _fits(algo, [h + (i == block) for i, h in enumerate(hidden)], budget)


def _search_round(r: Runner) -> None:
    """Round 1 (the search) run by hand on every client, ending in extraction."""
    a = r.algo
    tasks = a.plan(1, list(range(a.ctx.num_clients)))
    a.aggregate(1, tasks, r.backend.run(tasks))


@pytest.fixture(scope="module")
def main_run(tmp_path_factory) -> tuple[Runner, dict, list[dict]]:
    """The reference run: 2 tiers, one search round, one training round, serial backend."""
    out = tmp_path_factory.mktemp("dac_main")
    r = _runner(_cfg(out, "main"))
    summary = r.run()
    return r, summary, _rows(r.run_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Runner:
    """A set-up DAC (for tests that set gates and budgets themselves and call the extraction)."""
    # Both budgets below the supernet's, so that extraction has both to meet.
    budgets = {"small": {"macs": 0.36, "params": 0.36}}
    r = _built(_cfg(tmp_path_factory.mktemp("dac_built"), "built", {"budgets": budgets}))
    yield r
    r.backend.close()


# ---------------------------------------------------------------------------------------------- cost model
def test_cost_model_is_exact_for_any_expanded_channel_counts() -> None:
    cost = CostModel.of(SUPERNET)
    plain = profile_spec("mobilenetv2", 10, SHAPE, WIDTH)
    assert len(cost.full) == NUM_EXPANDING
    assert (cost.macs_full, cost.params_full) == (plain["macs"], plain["params"])
    g = torch.Generator().manual_seed(7)
    picks = [tuple(int(torch.randint(1, f + 1, (1,), generator=g)) for f in cost.full) for _ in range(3)]
    picks.append((1,) * NUM_EXPANDING)
    for h in picks:
        prof = profile_spec("mobilenetv2", 10, SHAPE, WIDTH, hidden_channels=h)
        assert cost.macs(h) == prof["macs"], h
        assert cost.params(h) == prof["params"], h
        assert cost.macs(h) < cost.macs_full and cost.params(h) < cost.params_full


# ---------------------------------------------------------------------------------------------- gated model
def _gated_pair(gates: str = "soft", seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    plain = build_model("mobilenetv2", num_classes=10, input_shape=SHAPE, width=0.25)
    gated = build_model("mobilenetv2", num_classes=10, input_shape=SHAPE, width=0.25, gates=gates)
    gated.load_state_dict(plain.state_dict(), strict=False)
    return plain.eval(), gated.eval()


@pytest.mark.parametrize("gates", ["soft", "hard"])
def test_gated_model_adds_only_gate_buffers_on_expanding_blocks(gates: str) -> None:
    plain, gated = _gated_pair(gates)
    assert set(dict(gated.named_parameters())) == set(dict(plain.named_parameters()))
    extra = set(gated.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.gate.logits" for i in EXPANDING}
    assert set(plain.state_dict()) <= set(gated.state_dict())
    assert len(EXPANDING) == NUM_EXPANDING and 0 not in EXPANDING  # block 0 (t = 1) does not expand
    named_buffers = dict(gated.named_buffers())
    for i in EXPANDING:
        logits = named_buffers[f"blocks.{i}.gate.logits"]
        assert logits.shape == (gated.blocks[i].depthwise[0].out_channels,)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to rounding, relative to the output's size (the initial logits are small)."""
    return bool((a - b).norm() <= rel * b.norm()) and bool(b.norm() > 0)


@pytest.mark.parametrize(("gates", "open_", "closed"), [("soft", 50.0, -50.0), ("hard", 0.0, -0.1)])
def test_open_gates_give_the_ungated_output_and_closed_ones_drop_the_channels(gates: str, open_: float,
                                                                               closed: float) -> None:
    plain, gated = _gated_pair(gates, seed=1)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in EXPANDING:
            gated.blocks[i].gate.logits.fill_(open_)
        ref = plain(x)
        assert _close(gated(x), ref)

        b, chans = EXPANDING[3], torch.tensor([0, 2, 5])
        gated.blocks[b].gate.logits[chans] = closed
        cut = copy.deepcopy(plain)
        cut.blocks[b].project[0].weight[:, chans] = 0.0
        want = cut(x)
        assert (want - ref).norm() > 1e-3 * ref.norm()  # the channels mattered
        assert _close(gated(x), want)


def test_hard_gates_are_0_or_1_forward_and_pass_the_sigmoid_gradient_back() -> None:
    gate = ChannelGate(5, hard=True)
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0])
    gate.logits.copy_(logits)
    gate.logits.requires_grad_(True)
    x = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    out = gate(x)
    assert torch.allclose(out, x * (logits >= 0).float().view(1, -1, 1, 1), rtol=1e-6, atol=0)
    out.sum().backward()
    s = torch.sigmoid(logits)
    assert torch.allclose(gate.logits.grad, x.sum((0, 2, 3)) * s * (1 - s), rtol=1e-5, atol=1e-6)
    soft = ChannelGate(5)
    soft.logits.copy_(logits)
    assert torch.allclose(soft(x), x * s.view(1, -1, 1, 1))


def test_open_hard_gates_multiply_by_exactly_one() -> None:
    gate = ChannelGate(5, hard=True)
    gate.logits.copy_(torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0]))
    x = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    out = gate(x)  # as in training: the straight-through path is built whenever the gate runs
    assert torch.equal(out[:, 2:], x[:, 2:]) and torch.equal(out[:, :2], torch.zeros_like(x[:, :2]))


def test_gate_buffers_sit_in_their_blocks_hidden_channel_group() -> None:
    gated = build_model("mobilenetv2", num_classes=10, input_shape=SHAPE, width=0.25, gates="soft")
    groups = gated.channel_groups()
    for i in EXPANDING:
        key = f"blocks.{i}.gate.logits"
        holding = [g for g in groups if (key, 0, 1) in g]
        assert len(holding) == 1, key
        members = {(k, a) for k, a, _ in holding[0]}
        assert {(f"blocks.{i}.expand.0.weight", 0), (f"blocks.{i}.depthwise.0.weight", 0),
                (f"blocks.{i}.project.0.weight", 1)} <= members
    spec = ModelSpec.make("mobilenetv2", 10, SHAPE, 0.25, gates="hard")
    layout = ChannelLayout(spec)  # consistent sizes, or it raises
    for i in EXPANDING:
        gid, _ = layout.member_of[(f"blocks.{i}.gate.logits", 0)]
        assert layout.sizes[gid] == gated.blocks[i].depthwise[0].out_channels


def test_an_unknown_gates_option_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"model\.options\.gates: .*'yes'"):
        build_model("mobilenetv2", num_classes=10, input_shape=SHAPE, width=0.25, gates="yes")


# ---------------------------------------------------------------------------------------------- search step
def _search_task(r: Runner, epochs: int = 3, **extras: float):
    (task,) = r.algo.plan(1, [0])
    return dataclasses.replace(task, extras={**task.extras, **extras},
                               train=dataclasses.replace(task.train, epochs=epochs))


def _expected_macs(algo, start: dict, delta: dict) -> float:
    """The cost model at the gates ``start + delta``: channels kept by hard gates, or the sigmoids' sum."""
    c = algo.cost
    logits = [(start[k] + delta[k]).double() for k in algo.gate_keys]
    hard = algo.params.gate_forward == "hard"
    open_ = [float((lg >= 0).sum() if hard else torch.sigmoid(lg).sum()) for lg in logits]
    return c.macs_full - sum(m * (f - o) for m, f, o in zip(c.macs_per, c.full, open_, strict=True))


def test_search_step_penalises_a_budget_overshoot_and_trains_the_gates(built: Runner) -> None:
    a = built.algo
    c = a.cost
    tight = {"macs_budget": 0.2 * c.macs_full, "params_budget": 0.2 * c.params_full}
    # A fast gate rate: these few steps must carry logits from gate_init across 0 (hard gates count whole channels).
    bound, free = (built.backend.run([_search_task(built, bound_weight=w, gate_lr=0.5, **tight)])[0]
                   for w in (100.0, 0.0))
    start = _search_task(built).state
    assert bound.num_steps > 0 and free.num_steps > 0
    assert bound.extras["expected_macs"] < free.extras["expected_macs"]
    assert bound.extras["expected_params"] < free.extras["expected_params"]
    # below the gates it started from (all at sigmoid(gate_init))
    assert bound.extras["expected_macs"] < _expected_macs(a, start, {k: torch.zeros_like(start[k])
                                                                     for k in a.gate_keys})
    for res in (bound, free):
        assert set(a.gate_keys) <= set(res.delta)
        assert any(bool(res.delta[k].abs().gt(0).any()) for k in a.gate_keys)
        # the reported expectation is the cost model at the returned gates
        assert res.extras["expected_macs"] == pytest.approx(_expected_macs(a, start, res.delta), rel=1e-6)
        assert any(bool(res.delta[k].abs().gt(0).any()) for k in res.delta if k not in a.gate_keys)


def test_gates_move_on_the_cross_entropy_alone(built: Runner) -> None:
    a = built.algo
    task = _search_task(built, epochs=1, bound_weight=0.0, entropy_weight=0.0)
    res = built.backend.run([task])[0]
    moved = sum(int(res.delta[k].ne(0).sum()) for k in a.gate_keys)
    assert moved > 0
    # and the reused model buffer is left without gradients on its gates for the next task
    gates = [m.logits for m in built.backend.buffers.get(task.spec).modules() if hasattr(m, "logits")]
    assert len(gates) == NUM_EXPANDING
    assert all(not g.requires_grad and g.grad is None for g in gates)


# ---------------------------------------------------------------------------------------------- extraction
def _kept(arch: list[torch.Tensor]) -> list[set[int]]:
    return [set(k.tolist()) for k in arch]


def test_extraction_removes_the_lowest_gates_until_the_budgets_hold(built: Runner) -> None:
    a = built.algo
    a.params = a.params.model_copy(update={"fill_budget": True})
    budget = a.budgets["small"]
    assert budget["macs"] < a.cost.macs_full and budget["params"] < a.cost.params_full
    _set_gates(a, "small", 10.0, seed=0)  # every gate open, none equal
    arch = a.architecture(1, "small")
    probs = _probs(a, "small")
    hidden = [len(k) for k in arch]
    assert _fits(a, hidden, budget) and min(hidden) >= 1
    for k in arch:
        assert torch.equal(k, k.sort().values) and len(set(k.tolist())) == len(k)
    kept, removed = _kept(arch), []
    for b, p in enumerate(probs):
        removed += [(float(p[c]), b, c) for c in range(len(p)) if c not in kept[b]]
    assert removed
    # lowest first: a removed channel's gate is below every kept one's, but a block's last channel stays
    for pr, _, _ in removed:
        for b, p in enumerate(probs):
            for c in kept[b]:
                assert float(p[c]) > pr or len(kept[b]) == 1
    # and no more than needed: putting back the strongest removed channel breaks a budget
    _, b, _ = max(removed)
    assert not _fits_with_one_more(a, hidden, b, budget)


def test_extraction_fills_the_budget_with_the_strongest_closed_gates(built: Runner) -> None:
    a = built.algo
    a.params = a.params.model_copy(update={"fill_budget": True})
    budget = a.budgets["small"]
    _set_gates(a, "small", -10.0, seed=1)  # every gate closed
    arch = a.architecture(1, "small")
    probs = _probs(a, "small")
    hidden = [len(k) for k in arch]
    assert _fits(a, hidden, budget)
    kept = _kept(arch)
    for b, p in enumerate(probs):
        assert int(torch.argmax(p)) in kept[b]  # every block keeps its strongest channel
    added = [float(p[c]) for b, p in enumerate(probs) for c in kept[b] if c != int(torch.argmax(p))]
    left = [(float(p[c]), b) for b, p in enumerate(probs) for c in range(len(p)) if c not in kept[b]]
    assert added and left
    assert min(added) > max(pr for pr, _ in left)  # strongest first
    _, b = max(left)  # the next in line no longer fits
    assert not _fits_with_one_more(a, hidden, b, budget)


def test_without_fill_closed_gates_keep_one_channel_per_block(built: Runner) -> None:
    a = built.algo
    a.params = a.params.model_copy(update={"fill_budget": False})
    try:
        _set_gates(a, "small", -10.0, seed=2)
        arch = a.architecture(1, "small")
        assert [k.tolist() for k in arch] == [[int(torch.argmax(p))] for p in _probs(a, "small")]
    finally:
        a.params = a.params.model_copy(update={"fill_budget": True})


def test_the_hard_gated_supernet_computes_the_extracted_architecture(tmp_path: Path) -> None:
    r = _built(_cfg(tmp_path, "hard", {"fill_budget": False}))  # big's budget is the supernet: gates decide
    try:
        a = r.algo
        assert a.params.gate_forward == "hard"
        g = torch.Generator().manual_seed(5)
        logits = {}
        for k in a.gate_keys:
            lg = torch.randn(a.gates["big"][k].shape, generator=g)
            lg[int(torch.argmax(lg))] = lg.abs().max() + 0.1  # every block keeps a channel
            logits[k] = lg
        a.gates["big"] = logits
        a.finish_search()
        kept = [torch.nonzero(logits[k] >= 0).flatten().tolist() for k in a.gate_keys]
        assert [k.tolist() for k in a.arch["big"]] == kept
        assert sum(map(len, kept)) < sum(a.cost.full)

        # float64: equal up to rounding
        x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        supernet = a.search_spec.build().double().eval()  # static BN: batch statistics, as in training
        supernet.load_state_dict({**a.state, **logits})
        sub = a.train_specs["big"].build().double().eval()
        sub.load_state_dict(a.level_params("big"))
        with torch.no_grad():
            want = supernet(x)
            assert _close(sub(x), want, rel=1e-10)
            supernet.load_state_dict({k: torch.ones_like(v) for k, v in logits.items()}, strict=False)
            assert (supernet(x) - want).norm() > 1e-3 * want.norm()  # the closed channels mattered
    finally:
        r.backend.close()


def test_extraction_respects_a_tiers_model_bytes(tmp_path: Path) -> None:
    whole = len(pack_exact({k: torch.zeros(s) for k, s in ChannelLayout(SUPERNET).shapes.items()}))
    limit = whole // 2
    cfg = _cfg(tmp_path, "bytes", {"budgets": {"small": {"macs": 1.0, "params": 1.0}}},
               devices={"tiers": [{"name": "big", "width": 1.0},
                                  {"name": "small", "width": 1.0, "model_bytes": limit}]})
    r = _built(cfg)
    try:
        a = r.algo
        assert a.budgets["small"]["macs"] == a.cost.macs_full  # no MACs or parameter limit: bytes decide
        for label in a.labels:
            _set_gates(a, label, 10.0, seed=3)
        a.finish_search()
        small = extract(a.state, a.arch_plans["small"])
        assert len(pack_exact(small)) <= limit
        assert len(pack_exact(extract(a.state, a.arch_plans["big"]))) == whole
        hidden = [len(k) for k in a.arch["small"]]
        assert a.search_stats["small"]["hidden_channels"] == hidden
        assert len(pack_exact(small)) > limit * 0.9  # cut to the limit, not far below it
        # The search itself trains the whole supernet on every tier: said, for the tier it overruns only.
        over = [n for n in r.ctx.notes if "trains beyond its budget" in n]
        assert len(over) == 1 and "tier 'small'" in over[0] and "devices.tiers.1.model_bytes" in over[0]
    finally:
        r.backend.close()


def test_model_bytes_hold_with_tracked_bn_statistics(tmp_path: Path, monkeypatch) -> None:
    # MACs and parameters do not depend on tracked statistics: reuse the (cached) static-BN cost model
    # rather than profile the tracked supernet again.
    cost = CostModel.of(SUPERNET)
    monkeypatch.setattr(CostModel, "of", classmethod(lambda cls, spec: cost))
    whole = len(pack_exact({k: torch.zeros(s) for k, s in ChannelLayout(SUPERNET).shapes.items()}))
    limit = whole // 2
    cfg = _cfg(tmp_path, "tracked", {"static_bn": False, "budgets": {"small": {"macs": 1.0, "params": 1.0}}},
               devices={"tiers": [{"name": "big", "width": 1.0},
                                  {"name": "small", "width": 1.0, "model_bytes": limit}]})
    r = _built(cfg)
    try:
        a = r.algo
        for label in a.labels:
            _set_gates(a, label, 10.0, seed=3)
        a.finish_search()
        state = a.level_params("small")  # what a small client is sent
        assert any(v.dtype == torch.int64 for v in state.values())  # tracked statistics included
        size = len(pack_exact(state))
        assert size <= limit, f"the small tier is sent {size:,} B, its model_bytes is {limit:,}"
    finally:
        r.backend.close()


# ---------------------------------------------------------------------------------------------- aggregation
def test_each_global_channel_is_averaged_over_the_architectures_that_keep_it(tmp_path: Path) -> None:
    # eval every 3 rounds: round 2 is aggregated without a BN query
    r = _built(_cfg(tmp_path, "agg", federation={"rounds": 3}, eval={"every": 3}))
    try:
        a = r.algo
        for i, label in enumerate(a.labels):
            _set_gates(a, label, 10.0, seed=10 + i)
        full_m, full_p = a.cost.macs_full, a.cost.params_full
        a.budgets["big"] = {"macs": int(0.7 * full_m), "params": int(0.7 * full_p), "source": "test"}
        a.budgets["small"] = {"macs": int(0.35 * full_m), "params": int(0.35 * full_p), "source": "test"}
        a.finish_search()
        tasks = a.plan(2, list(range(a.ctx.num_clients)))
        results = r.backend.run(tasks)
        before = {k: v.clone() for k, v in a.state.items()}
        a.aggregate(2, tasks, results)
        tier = {res.client: a.level_of(2, res.client) for res in results}
        assert set(tier.values()) == {"big", "small"}
        kinds = {"none": 0, "one": 0, "both": 0}
        for b, i in enumerate(EXPANDING):
            # the expansion's rows are block b's expanded channels
            key = f"blocks.{i}.expand.0.weight"
            change = a.state[key] - before[key]
            for ch in range(before[key].shape[0]):
                rows, holders = [], set()
                for res in results:
                    kept = a.arch[tier[res.client]][b].tolist()
                    if ch in kept:
                        rows.append(res.delta[key][kept.index(ch)])
                        holders.add(tier[res.client])
                if not rows:
                    kinds["none"] += 1
                    assert torch.equal(a.state[key][ch], before[key][ch]), (key, ch)
                    continue
                kinds["both" if len(holders) == 2 else "one"] += 1
                want = torch.stack(rows).double().mean(0).float()
                assert torch.allclose(change[ch], want, rtol=1e-4, atol=1e-7), (key, ch)
        assert all(kinds.values()), kinds  # channels of all three kinds were checked
    finally:
        r.backend.close()


# ---------------------------------------------------------------------------------------------- whole runs
def test_a_run_searches_then_trains_each_tier_within_its_budget(main_run) -> None:
    r, s, rows = main_run
    d = s["dac"]
    assert d["supernet_macs"] == profile_spec("mobilenetv2", 10, SHAPE, WIDTH)["macs"]
    for name, tier_width in (("big", 1.0), ("small", 0.5)):
        t = d["tiers"][name]
        assert t["macs"] <= t["budget_macs"] and t["params"] <= t["budget_params"]
        # default budget: the MACs of the tier's width-`width` MobileNet-V2; parameters unbounded (no model_bytes)
        own = profile_spec("mobilenetv2", 10, SHAPE, WIDTH * tier_width)
        assert (t["budget_macs"], t["budget_params"]) == (own["macs"], d["supernet_params"])
        prof = profile_spec("mobilenetv2", 10, SHAPE, WIDTH, hidden_channels=tuple(t["hidden_channels"]))
        assert (t["macs"], t["params"]) == (prof["macs"], prof["params"])
        assert (s["levels"][name]["macs"], s["levels"][name]["params"]) == (prof["macs"], prof["params"])
        assert s["levels"][name]["rate"] is None  # no width rate: the architecture is in the dac entry
        assert t["kept"] == sum(t["hidden_channels"]) and t["of"] == sum(r.algo.cost.full)
    small = d["tiers"]["small"]
    assert small["kept"] < small["of"] and small["macs"] < d["supernet_macs"]
    assert all(h <= f for h, f in zip(small["hidden_channels"], r.algo.cost.full, strict=True))

    assert [row["round"] for row in rows] == [1, 2]
    first, second = rows[0], rows[1]
    assert first["phase"] == "search" and "phase" not in second
    assert first["comm"][0]["algorithm"]["phase"] == "search"
    assert "phase" not in second["comm"][0].get("algorithm", {})
    assert first["architectures"] == {k: v["hidden_channels"] for k, v in d["tiers"].items()}
    assert set(first["eval"]) == {"big", "small"} and set(second["eval"]) == {"big", "small"}
    # the search sends each tier the whole supernet; training sends the small tier less
    down1, down2 = first["comm"][0]["bytes_down"], second["comm"][0]["bytes_down"]
    small_clients = [c for c in range(6) if r.algo.level_of(2, c) == "small"]
    assert small_clients and all(down2[str(c)] < down1[str(c)] for c in small_clients)


def test_explicit_budgets_are_met_and_change_the_architecture(tmp_path: Path, main_run) -> None:
    _, s, _ = main_run
    r = _built(_cfg(tmp_path, "budgets", {"budgets": {"small": {"macs": 0.3, "params": 0.4}}}, eval={"every": 2}))
    try:
        a = r.algo
        _search_round(r)
        t = a.search_stats["small"]
        assert t["budget_source"] == "budgets"
        assert t["budget_macs"] == int(0.3 * a.cost.macs_full) and t["budget_params"] == int(0.4 * a.cost.params_full)
        assert t["macs"] <= t["budget_macs"] and t["params"] <= t["budget_params"]
        prof = profile_spec("mobilenetv2", 10, SHAPE, WIDTH, hidden_channels=tuple(t["hidden_channels"]))
        assert (t["macs"], t["params"]) == (prof["macs"], prof["params"])
        assert t["hidden_channels"] != s["dac"]["tiers"]["small"]["hidden_channels"]
        assert a.search_stats["big"]["budget_source"] == "width 1"
    finally:
        r.backend.close()


def test_a_run_resumed_after_the_search_equals_an_uninterrupted_one(tmp_path: Path, main_run, kill_run) -> None:
    ref, ref_summary, _ = main_run
    cfg = _cfg(ref.run_dir.parent, "resumed")
    kill_run(copy.deepcopy(cfg), 2)  # round 1 (the search) recorded and checkpointed, round 2 not
    out = ref.run_dir.parent / "resumed"
    assert [row["round"] for row in _rows(out)] == [1]
    summary = _runner(cfg, resume=True).run()
    assert (out / "metrics.jsonl").read_bytes() == (ref.run_dir / "metrics.jsonl").read_bytes()
    assert summary["dac"] == ref_summary["dac"] and summary["final"] == ref_summary["final"]
    assert {k: v for k, v in summary.items() if k != "name"} == {k: v for k, v in ref_summary.items() if k != "name"}


def test_the_process_backend_gives_the_serial_metrics(main_run) -> None:
    ref, ref_summary, ref_rows = main_run
    cfg = _cfg(ref.run_dir.parent, "process", engine={"backend": "process"})
    summary = _runner(cfg).run()
    rows = _rows(ref.run_dir.parent / "process")
    assert rows[0]["phase"] == "search"
    assert rows == ref_rows  # losses, evaluations, architectures, gates and bytes, bit for bit
    assert summary["dac"] == ref_summary["dac"]


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c["model"].update(name="lenet5"), r"^model\.name: .*mobilenetv2"),
    (lambda c: c["model"].update(options={"hidden_channels": [8] * 16}), r"^model\.options\.hidden_channels: "),
    (lambda c: c["model"].update(options={"gates": True}), r"^model\.options\.gates: "),
    (lambda c: c["algorithm"]["params"].update(model_split="a1-b1"), r"algorithm\.params\.model_split: .*unset"),
    (lambda c: c["algorithm"]["params"].update(rates={"a": 1.0}), r"^algorithm\.params\.rates: .*does not apply"),
    (lambda c: c["algorithm"]["params"].update(assignment="dynamic"), r"^algorithm\.params\.assignment: .*tier"),
    (lambda c: c["algorithm"]["params"].update(scaler=True), r"^algorithm\.params\.scaler: .*rate 1"),
    (lambda c: c["algorithm"]["params"].update(gate_lrr=0.1), r"^algorithm\.params\.gate_lrr: unknown key .*gate_lr"),
])
def test_config_errors_at_validation(tmp_path: Path, change, match: str) -> None:
    cfg = _cfg(tmp_path / "runs", "bad")
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c["algorithm"]["params"].update(search_rounds=2),
     r"^algorithm\.params\.search_rounds: .*federation\.rounds \(2\)"),
    (lambda c: c["algorithm"]["params"].update(budgets={"medium": {"macs": 0.5}}),
     r"^algorithm\.params\.budgets: 'medium' is not a device tier"),
    (lambda c: c["algorithm"]["params"].update(budgets={"small": {"params": 100}}),
     r"^algorithm\.params\.budgets\.small\.params: tier 'small' allows 100 params"),
    (lambda c: c["devices"]["tiers"][1].update(width=0.05), r"^devices\.tiers\.1\.width: tier 'small'"),
])
def test_config_errors_at_setup_leave_no_run_folder(tmp_path: Path, change, match: str) -> None:
    cfg = _cfg(tmp_path / "runs", "bad")
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        _runner(cfg).run()
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_tiers_default_params_budget_is_what_its_model_bytes_hold(tmp_path: Path) -> None:
    whole = len(pack_exact({k: torch.zeros(s) for k, s in ChannelLayout(SUPERNET).shapes.items()}))
    limit = int(whole * 0.6)
    cfg = _cfg(tmp_path, "default_bytes", devices={"tiers": [{"name": "big", "width": 1.0},
                                                              {"name": "small", "width": 0.5, "model_bytes": limit}]})
    r = _built(cfg)
    try:
        a = r.algo
        small, big = a.budgets["small"], a.budgets["big"]
        assert small["params"] == limit // 4 < a.cost.params_full  # float32 parameters within model_bytes
        assert small["macs"] == profile_spec("mobilenetv2", 10, SHAPE, WIDTH * 0.5)["macs"]
        assert "model_bytes" in small["source"] and "model_bytes" not in big["source"]
        assert big["params"] == a.cost.params_full  # no model_bytes: no parameter limit
    finally:
        r.backend.close()
