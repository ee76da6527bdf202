"""HeteroFL / FedRolex / Federated Dropout: channel coupling, index plans, sum-and-count, BN query,
level assignment and parameters (unit level; whole runs are in test_heterofl_runs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedslim.algorithms.heterofl import parse_model_split
from fedslim.algorithms.submodel import (
    ChannelLayout,
    Contribution,
    bn_stats_procedure,
    combine,
    expand,
    extract,
    merge_bn_stats,
    state_shapes,
)
from fedslim.config import ConfigError, validate
from fedslim.data.types import TensorData
from fedslim.engine.run import Runner
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec

# (model, input shape, global width, options): every family of the zoo, small enough to be quick.
FAMILIES = [
    ("mlp", (1, 8, 8), 1.0, {"norm": "bn"}),
    ("twocnn", (1, 8, 8), 0.5, {"norm": "bn"}),
    ("lenet5", (1, 8, 8), 1.0, {"norm": "bn"}),
    ("alexnet", (1, 8, 8), 0.125, {"norm": "bn", "dropout": 0.0}),
    ("vgg16", (3, 32, 32), 0.125, {}),
    ("preresnet18", (3, 8, 8), 0.25, {}),
    ("preresnet18", (3, 8, 8), 0.25, {"blocks": "standard"}),
    ("mobilenetv2", (3, 8, 8), 0.25, {}),
    ("heterofl_cnn", (1, 8, 8), 0.25, {}),
]


def _spec(name: str, shape: tuple[int, ...], width: float, opts: dict, classes: int = 7) -> ModelSpec:
    return ModelSpec.make(name, classes, shape, width, **opts)


def _random_state(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = spec.build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in state.items():
        if k.endswith("running_mean") or (k.endswith(".bias") and v.dim() == 1):
            state[k] = torch.randn(v.shape, generator=g) * 0.3
        elif k.endswith("running_var") or (k.endswith(".weight") and v.dim() == 1):  # norm scales
            state[k] = torch.rand(v.shape, generator=g) + 0.5
    return state


def _zero_outside(state: dict[str, torch.Tensor], layout: ChannelLayout,
                  chosen: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global state with every channel the sub-model does not hold zeroed in all coupled tensors."""
    out = {k: v.clone() for k, v in state.items()}
    assert layout.groups is not None
    for gid, members in enumerate(layout.groups):
        if gid not in chosen:
            continue
        keep = torch.zeros(layout.sizes[gid], dtype=torch.bool)
        keep[chosen[gid]] = True
        drop = torch.nonzero(~keep).flatten()
        for key, axis, block in members:
            out[key].index_fill_(axis, expand(drop, block), 0.0)
    return out


@pytest.mark.parametrize(("name", "shape", "width", "opts"), FAMILIES,
                         ids=[f"{f[0]}-{f[3].get('blocks', '')}" for f in FAMILIES])
def test_channel_groups_make_any_channel_choice_a_valid_sub_network(name, shape, width, opts):
    """A sub-model cut with arbitrary (unsorted, random) channels per group computes exactly what the
    global model computes with all other channels zeroed. A missing or wrong coupling (an undeclared
    residual tie, a wrong flatten block, a depthwise conv treated as dense) breaks this."""
    gspec = _spec(name, shape, width, opts)
    sspec = gspec.with_(width=width / 2)
    layout = ChannelLayout(gspec)
    gen = torch.Generator().manual_seed(0)
    chosen: dict[int, torch.Tensor] = {}

    def choose(gid: int, n: int, k: int) -> torch.Tensor:
        chosen[gid] = torch.randperm(n, generator=gen)[:k]
        return chosen[gid]

    plan = layout.plan(state_shapes(sspec), choose)
    assert chosen, "no group shrank"
    state = _random_state(gspec, 0)
    sub = sspec.build().eval()
    sub.load_state_dict(extract(state, plan))
    full = gspec.build().eval()
    full.load_state_dict(_zero_outside(state, layout, chosen))
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        a, b = sub(x), full(x)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inconsistent_channels_are_detected_by_that_check():
    """Negative control for the test above: the next layer reading other channels than the ones
    kept gives a different output."""
    gspec = _spec("heterofl_cnn", (1, 8, 8), 0.25, {})
    sspec = gspec.with_(width=0.125)
    layout = ChannelLayout(gspec)
    gen = torch.Generator().manual_seed(1)
    chosen: dict[int, torch.Tensor] = {}

    def choose(gid: int, n: int, k: int) -> torch.Tensor:
        chosen[gid] = torch.randperm(n, generator=gen)[:k]
        return chosen[gid]

    plan = layout.plan(state_shapes(sspec), choose)
    state = _random_state(gspec, 1)
    bad = dict(plan)
    axes = list(bad["blocks.5.weight"])  # second conv, input axis: read a shifted channel set
    axes[1] = (axes[1] + 1) % layout.sizes[0]
    bad["blocks.5.weight"] = tuple(axes)
    full = gspec.build().eval()
    full.load_state_dict(_zero_outside(state, layout, chosen))
    sub = sspec.build().eval()
    sub.load_state_dict(extract(state, bad))
    x = torch.randn(4, 1, 8, 8, generator=gen)
    with torch.no_grad():
        assert not torch.allclose(sub(x), full(x), rtol=1e-4, atol=1e-5)


def test_prefix_plan_is_the_narrow_models_shape_and_needs_no_declaration():
    gspec = _spec("preresnet18", (3, 8, 8), 0.25, {"track_running_stats": False})
    sspec = gspec.with_(width=0.25 / 16)
    layout = ChannelLayout(gspec)
    plan = layout.prefix_plan(state_shapes(sspec))
    state = _random_state(gspec, 2)
    sub = extract(state, plan)
    for k, v in sub.items():
        assert v.shape == state_shapes(sspec)[k]
        assert torch.equal(v, state[k][tuple(slice(0, n) for n in v.shape)])
    assert layout.output_keys == ("linear.weight", "linear.bias")


def test_models_without_declaration_support_prefix_only():
    class Plain(torch.nn.Module):
        def __init__(self, h: int):
            super().__init__()
            self.fc = torch.nn.Linear(4, h)
            self.out = torch.nn.Linear(h, 3)

    layout = ChannelLayout.__new__(ChannelLayout)
    layout.spec = _spec("mlp", (4,), 1.0, {})
    layout.shapes = {k: tuple(v.shape) for k, v in Plain(8).state_dict().items()}
    layout.groups = None
    sub = {k: tuple(v.shape) for k, v in Plain(2).state_dict().items()}
    assert layout.prefix_plan(sub)["fc.weight"] == (2, 4)
    with pytest.raises(ValueError, match="declares no channel groups"):
        layout.plan(sub, lambda g, n, k: torch.arange(k))


# ---------------------------------------------------------------------------------------------
# sum-and-count


def _w(**kw: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(kw)


def test_combine_averages_each_element_over_its_holders_and_leaves_the_rest():
    state = {"w": torch.arange(8, dtype=torch.float32).view(4, 2), "s": torch.tensor(5, dtype=torch.long)}
    a = Contribution(_w(w=torch.full((4, 2), 1.0), s=torch.tensor(2)), {"w": (4, 2), "s": ()})
    b = Contribution(_w(w=torch.full((2, 2), 3.0), s=torch.tensor(4)), {"w": (2, 2), "s": ()})
    c = Contribution(_w(w=torch.full((2, 1), 5.0), s=torch.tensor(0)), {"w": (torch.tensor([3, 1]), 1), "s": ()})
    d = combine(state, [a, b, c])
    expect = torch.tensor([[2.0, 2.0], [3.0, 2.0], [1.0, 1.0], [3.0, 1.0]])  # (1+3)/2, (1+3+5)/3 ...
    assert torch.equal(d["w"], expect)
    assert d["s"].dtype == torch.long and int(d["s"]) == 2  # round(6 / 3)
    # Without the full-width client, row 2 and column 1 of rows 1/3 are untouched: delta exactly 0.
    d2 = combine(state, [b, c])
    assert torch.equal(d2["w"], torch.tensor([[3.0, 3.0], [4.0, 3.0], [0.0, 0.0], [5.0, 0.0]]))


def test_combine_output_rows_only_from_the_clients_labels_and_weights():
    state = {"head.weight": torch.zeros(3, 2), "head.bias": torch.zeros(3)}
    full = {"head.weight": (3, 2), "head.bias": (3,)}
    a = Contribution({"head.weight": torch.full((3, 2), 1.0), "head.bias": torch.full((3,), 1.0)}, full,
                     weight=1.0, rows=torch.tensor([0, 1]))
    b = Contribution({"head.weight": torch.full((3, 2), 4.0), "head.bias": torch.full((3,), 4.0)}, full,
                     weight=3.0, rows=torch.tensor([1]))
    d = combine(state, [a, b], output_keys=["head.weight", "head.bias"])
    assert d["head.bias"].tolist() == [1.0, (1.0 * 1 + 4.0 * 3) / 4, 0.0]
    assert d["head.weight"][:, 0].tolist() == [1.0, 3.25, 0.0]
    # Rows only restrict the output layer; any other tensor takes all rows.
    d = combine(state, [a, b])
    assert d["head.bias"].tolist() == [3.25, 3.25, 3.25]


# ---------------------------------------------------------------------------------------------
# model_split, assignment, parameters


@pytest.mark.parametrize(("text", "expect"), [
    ("a1-b1-c1-d1-e1", [("a", 1.0, 1), ("b", 0.5, 1), ("c", 0.25, 1), ("d", 0.125, 1), ("e", 0.0625, 1)]),
    ("a2-b8", [("a", 1.0, 2), ("b", 0.5, 8)]),
    ("a-e", [("a", 1.0, 1), ("e", 0.0625, 1)]),
    ("e", [("e", 0.0625, 1)]),
])
def test_model_split_notation(text, expect):
    rates = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
    assert parse_model_split(text, rates) == expect


@pytest.mark.parametrize("bad", ["a0", "x1", "a1--b1", "a1-a2", "", "1a", "a1,b1"])
def test_bad_model_split_is_a_one_line_config_error(bad, tiny_cfg):
    tiny_cfg["algorithm"] = {"name": "heterofl", "params": {"model_split": bad}}
    with pytest.raises(ConfigError) as e:
        validate(tiny_cfg)
    msg = str(e.value)
    assert msg.startswith("algorithm.params.model_split:") and "\n" not in msg
    assert "a1-b1-c1-d1-e1" in msg
    assert msg.count(repr(bad)) == 1, msg  # the offending value once ('(got ...)'), not twice



@pytest.mark.parametrize("bad", ["maybe", "Auto", 2])
def test_bad_masked_loss_names_the_field_and_the_allowed_values(bad, tiny_cfg):
    tiny_cfg["algorithm"] = {"name": "fed_dropout", "params": {"model_split": "a1-e1", "masked_loss": bad}}
    with pytest.raises(ConfigError) as e:
        validate(tiny_cfg)
    assert str(e.value) == f"algorithm.params.masked_loss: must be true, false or 'auto' (got {bad!r})"


@pytest.mark.parametrize("ok", [True, False, "auto"])
def test_masked_loss_accepts_true_false_and_auto(ok, tiny_cfg):
    tiny_cfg["algorithm"] = {"name": "heterofl", "params": {"masked_loss": ok}}
    assert validate(tiny_cfg).algorithm.params["masked_loss"] == ok

def _built(cfg: dict) -> Runner:
    os.environ.pop("FEDSLIM_DATA", None)
    r = Runner(validate(cfg))
    r._build()
    r.algo.setup()
    return r


def _cfg(tmp_path: Path, params: dict, *, algo: str = "heterofl", clients: int = 10, partition: dict | None = None,
         shape: tuple[int, ...] = (1, 8, 8), classes: int = 5, width: float = 0.25, **extra: dict) -> dict:
    cfg = {
        "name": "h", "seed": 4, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "num_clients": clients, "partition": partition or {"kind": "iid"},
                 "options": {"num_samples": 40 * clients, "test_samples": 100, "num_classes": classes,
                             "shape": list(shape)}},
        "model": {"name": "heterofl_cnn", "width": width},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "federation": {"rounds": 2, "participation": 0.5},
        "algorithm": {"name": algo, "params": params},
        "engine": {"progress": False},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def test_parameters_per_level_match_the_papers_mnist_cnn(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "a1-b1-c1-d1-e1"}, shape=(1, 28, 28), classes=10, width=1.0))
    levels = r.algo.summary()["levels"]
    assert list(levels) == ["a", "b", "c", "d", "e"]
    # HeteroFL, Table 1 (MNIST, CNN): 1.557 M at a, 6.6 K at e.
    assert levels["a"]["params"] == pytest.approx(1.557e6, rel=1e-3)
    assert levels["e"]["params"] == pytest.approx(6.6e3, rel=1e-2)
    p = [levels[x]["params"] for x in "abcde"]
    m = [levels[x]["macs"] for x in "abcde"]
    assert p == sorted(p, reverse=True) and m == sorted(m, reverse=True)
    assert [levels[x]["clients_round1"] for x in "abcde"] == [2, 2, 2, 2, 2]


def test_fixed_assignment_by_client_index_and_dynamic_redraws(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "a2-b8"}))
    assert [r.algo.level_of(1, c) for c in range(10)] == ["a"] * 2 + ["b"] * 8
    assert [r.algo.level_of(7, c) for c in range(10)] == ["a"] * 2 + ["b"] * 8
    r = _built(_cfg(tmp_path, {"model_split": "a1-e3", "assignment": "dynamic"}, clients=40))
    draws = [[r.algo.level_of(t, c) for c in range(40)] for t in range(1, 21)]
    assert len({tuple(d) for d in draws}) == 20
    share_e = sum(d.count("e") for d in draws) / (20 * 40)
    assert 0.68 < share_e < 0.82
    again = [[r.algo.level_of(t, c) for c in range(40)] for t in range(1, 21)]
    assert again == draws


def test_levels_from_device_tiers_when_no_model_split(tmp_path):
    cfg = _cfg(tmp_path, {}, devices={"tiers": [{"name": "big", "share": 1, "width": 1.0},
                                                {"name": "small", "share": 3, "width": 0.25}]})
    r = _built(cfg)
    assert r.algo.level_rates == {"big": 1.0, "small": 0.25}
    tiers = r.ctx.devices.assignment(1)
    assert [r.algo.level_of(1, c) for c in range(10)] == [["big", "small"][int(t)] for t in tiers]
    assert r.algo.train_specs["small"].width == pytest.approx(0.25 * 0.25)
    assert dict(r.algo.train_specs["small"].options)["scaler_rate"] == pytest.approx(0.25)


def test_global_rate_is_the_largest_level(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "e1"}, width=1.0))
    assert r.algo.global_spec.width == pytest.approx(1 / 16)
    assert dict(r.algo.train_specs["e"].options)["scaler_rate"] == 1.0  # e is the global model here


def test_plan_masks_and_static_bn(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "a1-e1"},
                    partition={"kind": "pathological", "classes_per_client": 2}))
    tasks = r.algo.plan(1, [0, 1, 5, 6])
    for t in tasks:
        assert t.label_mask is not None and int(t.label_mask.sum()) <= 2
        assert torch.equal(t.label_mask, r.ctx.store.client_labels(t.client))
        assert not any("running" in k for k in t.state)  # static BN: no statistics travel or train
        assert t.spec == r.algo.train_specs[r.algo.level_of(1, t.client)]
        assert {k: tuple(v.shape) for k, v in t.state.items()} == state_shapes(t.spec)
    assert tasks[0].state is tasks[1].state  # one payload per level (encoded once by the engine)
    r = _built(_cfg(tmp_path, {"model_split": "a1-e1"}))
    assert all(t.label_mask is None for t in r.algo.plan(1, [0, 5]))  # iid: auto = off


def test_fedrolex_window_rolls_per_layer_and_stays_coupled(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "a1-e1"}, algo="fedrolex"))
    algo = r.algo
    n0, n1 = algo.layout.sizes[0], algo.layout.sizes[1]  # 16 and 32 channels at global width 1/4
    for rnd in (1, 2, 17, 40):
        plan = algo.index_plan(rnd, 7, "e")
        w0, b0, bn0 = plan["blocks.0.weight"][0], plan["blocks.0.bias"][0], plan["blocks.2.weight"][0]
        k0 = len(w0)
        assert torch.equal(w0, (torch.arange(k0) + (rnd - 1)) % n0)
        assert torch.equal(b0, w0) and torch.equal(bn0, w0) and torch.equal(plan["blocks.5.weight"][1], w0)
        w1 = plan["blocks.5.weight"][0]
        assert torch.equal(w1, (torch.arange(len(w1)) + (rnd - 1)) % n1)
        assert plan["blocks.21.weight"][0] == 5  # classifier rows: every class
    assert algo.index_plan(1, 7, "a") == algo.layout.prefix_plan(algo.sub_shapes["a"])


def test_fed_dropout_draws_per_round_and_client_reproducibly(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "e1-a1"}, algo="fed_dropout"))
    algo = r.algo
    p1, p2, p3 = algo.index_plan(3, 0, "e"), algo.index_plan(3, 1, "e"), algo.index_plan(4, 0, "e")
    again = algo.index_plan(3, 0, "e")
    key = "blocks.10.weight"  # third conv
    assert not torch.equal(p1[key][0], p2[key][0]) and not torch.equal(p1[key][0], p3[key][0])
    assert all(torch.equal(x, y) for x, y in zip(p1[key], again[key], strict=True) if isinstance(x, torch.Tensor))
    assert torch.equal(p1[key][0], p1["blocks.12.weight"][0]) and torch.equal(p1[key][0], p1["blocks.15.weight"][1])


def test_aggregate_leaves_untouched_elements_and_counts_only_held_ones(tmp_path):
    r = _built(_cfg(tmp_path, {"model_split": "a1-e1"}, algo="fed_dropout"))
    algo = r.algo
    cohort = [5, 6, 7]  # all level e
    tasks = algo.plan(1, cohort)
    before = {k: v.clone() for k, v in algo.state.items()}
    results = [ClientResult(t.client, 1, {k: torch.ones_like(v) * (i + 1) for k, v in t.state.items()}, 10)
               for i, t in enumerate(tasks)]
    algo.aggregate(1, tasks, results)
    held = torch.zeros(before["blocks.10.weight"].shape, dtype=torch.float64)
    for t in tasks:
        held[torch.meshgrid(*[torch.arange(a) if isinstance(a, int) else a
                              for a in algo._pending[t.client][1]["blocks.10.weight"]], indexing="ij")] += 1
    diff = algo.state["blocks.10.weight"] - before["blocks.10.weight"]
    assert torch.equal(diff[held == 0], torch.zeros(int((held == 0).sum())))
    assert bool((diff[held > 0] > 0.99).all()) and bool((diff[held > 0] < 3.01).all())
    assert bool((held == 0).any())


# ---------------------------------------------------------------------------------------------
# static BN query


def test_bn_stats_pool_to_the_statistics_of_the_union_of_client_data():
    spec = ModelSpec.make("heterofl_cnn", 4, (1, 8, 8), 0.125, track_running_stats=True, scaler_rate=1.0)
    torch.manual_seed(0)
    params = {k: v for k, v in spec.build().state_dict().items() if "running" not in k and "num_batches" not in k}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(53, 1, 8, 8, generator=g) * 2 + 1
    parts = [TensorData(x[:20], torch.zeros(20, dtype=torch.long)),
             TensorData(x[20:], torch.zeros(33, dtype=torch.long))]
    results = []
    for i, d in enumerate(parts):
        t = ClientTask(client=i, round=1, spec=spec, state=params, kind="bn_stats", extras={"batch_size": 7})
        results.append(bn_stats_procedure(t, d, spec.build()))
    assert results[1].num_samples == 33
    pooled = merge_bn_stats(results, ["blocks.2", "blocks.7"])
    conv = torch.nn.Conv2d(1, 8, 3, 1, 1)
    conv.load_state_dict({"weight": params["blocks.0.weight"], "bias": params["blocks.0.bias"]})
    with torch.no_grad():
        y = conv(x).double()
    torch.testing.assert_close(pooled["blocks.2.running_mean"].double(), y.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled["blocks.2.running_var"].double(), y.transpose(0, 1).reshape(8, -1).var(1),
                               rtol=1e-4, atol=1e-5)
    assert pooled["blocks.7.running_mean"].shape == (16,)
    assert (pooled["blocks.7.running_var"] > 0).all()


@pytest.mark.parametrize("model, options, params, warned", [
    ("lenet5", {}, {"model_split": "a1-e1"}, True),
    ("lenet5", {"norm": "bn"}, {"model_split": "a1-e1"}, False),
    ("lenet5", {}, {"model_split": "a1-e1", "scaler": False}, False),
    ("lenet5", {}, {"model_split": "a1"}, False),  # one level: every Scaler is the identity
    ("heterofl_cnn", {}, {"model_split": "a1-e1"}, False),
])
def test_scaler_without_a_normalization_layer_is_flagged_at_setup(tmp_path, model, options, params, warned):
    cfg = _cfg(tmp_path, params, shape=(1, 28, 28), width=1.0, model={"name": model, "options": options})
    notes = [n for n in _built(cfg).ctx.notes if "algorithm.params.scaler" in n]
    assert bool(notes) == warned
    if warned:
        assert "multiplied by 16" in notes[0] and "model.options.norm=bn" in notes[0]


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "fed_dropout"])
def test_static_bn_asked_for_on_a_model_without_batchnorm_is_a_config_error(tmp_path, algo):
    params = {"model_split": "a1-e1", "static_bn": True, "scaler": False}
    cfg = _cfg(tmp_path, params, algo=algo, shape=(1, 28, 28), width=1.0, model={"name": "lenet5"})
    r = Runner(validate(cfg))
    with pytest.raises(ConfigError) as e:
        r.run()
    msg = str(e.value)
    assert msg.startswith("algorithm.params.static_bn:") and "lenet5" in msg and "\n" not in msg
    assert "model.options.norm=bn" in msg and "static_bn=false" in msg
    assert not r.run_dir.exists()
    # The default (not asked for) stays silent, and with BatchNorm the explicit setting is fine.
    _built(_cfg(tmp_path, {"model_split": "a1-e1", "scaler": False}, algo=algo, shape=(1, 28, 28), width=1.0,
                model={"name": "lenet5"}))
    _built(_cfg(tmp_path, params, algo=algo, shape=(1, 28, 28), width=1.0,
                model={"name": "lenet5", "options": {"norm": "bn"}}))


def test_rates_without_model_split_are_flagged_as_ignored(tmp_path):
    tiers = {"tiers": [{"name": "big", "share": 1, "width": 1.0}, {"name": "small", "share": 1, "width": 0.5}]}
    r = _built(_cfg(tmp_path, {"rates": {"a": 1.0, "b": 0.25}}, devices=tiers))
    assert r.algo.level_rates == {"big": 1.0, "small": 0.5}
    notes = [n for n in r.ctx.notes if "algorithm.params.rates" in n]
    assert len(notes) == 1 and "ignored" in notes[0] and "devices.tiers" in notes[0]
    r = _built(_cfg(tmp_path, {"rates": {"a": 1.0, "b": 0.25}, "model_split": "a1-b1"}, devices=tiers))
    assert r.algo.level_rates == {"a": 1.0, "b": 0.25}
    assert not [n for n in r.ctx.notes if "algorithm.params.rates" in n]


@pytest.mark.parametrize(("split", "assignment", "empty"), [
    ("a1-b1-c1-d1-e1", "fixed", "levels d, e no client"),
    ("a1-e2", "fixed", None),
    ("a1-b1-c1-d1-e1", "dynamic", None),  # re-drawn every round: any level may get clients
])
def test_levels_that_fixed_assignment_leaves_empty_are_flagged(tmp_path, split, assignment, empty):
    r = _built(_cfg(tmp_path, {"model_split": split, "assignment": assignment}, clients=3))
    notes = [n for n in r.ctx.notes if "no client" in n]
    counts = r.algo.summary()["levels"]
    if empty is None:
        assert notes == []
    else:
        assert len(notes) == 1 and empty in notes[0] and "algorithm.params.model_split" in notes[0], notes
        assert [counts[x]["clients_round1"] for x in "abcde"] == [1, 1, 1, 0, 0]



@pytest.mark.parametrize("assignment", ["fixed", "random"])
def test_a_tier_that_gets_no_client_is_flagged_under_fixed_and_random_device_assignment(tmp_path, assignment):
    # 'random' shuffles the tiers once, so a tier apportioned no client never gets one (as with 'fixed')
    tiers = [{"name": "big", "share": 1, "width": 1.0}, {"name": "small", "share": 0.01, "width": 0.5}]
    r = _built(_cfg(tmp_path, {}, devices={"tiers": tiers, "assignment": assignment}))
    notes = [n for n in r.ctx.notes if "no client" in n]
    assert len(notes) == 1 and "level small no client" in notes[0] and "devices.tiers" in notes[0], notes
    assert r.algo.describe_summary(r.algo.summary())[0].endswith("clients of 10):")


@pytest.mark.parametrize(("fed", "params", "noted"), [
    ({"weighted": True}, {}, True),
    ({"weighted": True}, {"weighted": True}, False),
    ({"weighted": False}, {}, False),
    ({}, {}, False),
])
def test_federation_weighted_set_against_the_algorithms_switch_is_flagged(tmp_path, fed, params, noted):
    r = _built(_cfg(tmp_path, {"model_split": "a1-e1", **params}, algo="fedrolex", federation=fed))
    notes = [n for n in r.ctx.notes if "federation.weighted" in n]
    assert bool(notes) == noted
    if noted:
        assert "algorithm.params.weighted=false" in notes[0]
