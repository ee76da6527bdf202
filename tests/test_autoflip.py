"""AutoFLIP: the exploration round, the learning-spread mask, masked training sent sparse, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedslim.algorithms.autoflip import learning_spread, normalized, prune_mask
from fedslim.cli import main
from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner
from fedslim.results import load_checkpoint


def _cfg(tiny_cfg: dict, name: str, **params: object) -> dict:
    cfg = dict(tiny_cfg, name=name)
    cfg["algorithm"] = {"name": "autoflip", "params": dict(params)}
    return cfg


def _rows(tiny_cfg: dict, name: str) -> list[dict]:
    path = Path(tiny_cfg["output_dir"]) / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _algorithm_state(tiny_cfg: dict, name: str) -> dict:
    return load_checkpoint(Path(tiny_cfg["output_dir"]) / name / "checkpoint.pt")["algorithm"]


def test_learning_spread_is_the_mean_squared_drift_over_explorers() -> None:
    d1 = {"w": torch.tensor([1.0, -2.0, 0.0]), "b": torch.tensor([5.0])}
    d2 = {"w": torch.tensor([3.0, 0.0, 0.5]), "b": torch.tensor([5.0])}
    s = learning_spread([d1, d2], ["w"])
    assert list(s) == ["w"]  # only the prunable tensors are scored
    assert torch.equal(s["w"], torch.tensor([5.0, 2.0, 0.125], dtype=torch.float64))


def test_normalizations_put_every_tensor_on_one_scale() -> None:
    s = {"a": torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), "c": torch.full((3,), 7.0, dtype=torch.float64),
         "r": torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)}
    mm = normalized(s, "minmax")
    assert torch.equal(mm["a"], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(mm["c"], torch.zeros(3, dtype=torch.float64))  # no spread: no division by zero
    rb = normalized(s, "robust")
    # median 3, quartiles 2 and 4: the outlier does not squash the rest as min-max would
    assert torch.allclose(rb["r"], torch.tensor([-1.0, -0.5, 0.0, 0.5, 48.5], dtype=torch.float64))
    assert torch.equal(normalized(s, "none")["r"], s["r"])
    # no IQR (most weights did not move): the range scales it, not raw units, and a constant tensor is 0
    flat = {"z": torch.tensor([0.0, 0.0, 0.0, 0.0, 1e-6], dtype=torch.float64), "c": s["c"]}
    rz = normalized(flat, "robust")
    assert torch.allclose(rz["z"], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(rz["c"], torch.zeros(3, dtype=torch.float64))


def test_prune_mask_prunes_exactly_the_lowest_scores_over_all_tensors_ties_by_position() -> None:
    scores = {"a": torch.tensor([[0.1, 0.5], [0.5, 0.9]]), "b": torch.tensor([0.5, 0.0, 0.7])}
    m = prune_mask(scores, 0.5)  # round(3.5) = 4 of 7 pruned
    assert torch.equal(m["a"], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    # the three tied 0.5s: the first two in position order go, b's stays
    assert torch.equal(m["b"], torch.tensor([1.0, 0.0, 1.0]))
    assert all(float(v.sum()) == v.numel() for v in prune_mask(scores, 0.0).values())  # amount 0 prunes none


def test_a_run_explores_then_trains_the_masked_model_and_sends_it_sparse(tiny_cfg: dict) -> None:
    tiny_cfg["federation"]["rounds"] = 4
    Runner(validate(_cfg(tiny_cfg, "af", amount=0.7, explorers=1.0))).run()
    Runner(validate(dict(tiny_cfg, name="fa", algorithm={"name": "fedavg"}))).run()
    rows, dense = _rows(tiny_cfg, "af"), _rows(tiny_cfg, "fa")
    assert rows[0]["phase"] == "explore" and all("phase" not in r for r in rows[1:])
    assert rows[0]["clients"] == 4 and all(r["clients"] == 2 for r in rows[1:])  # explorers, then participation

    st = _algorithm_state(tiny_cfg, "af")
    mask, state = st["mask"], st["state"]
    n = sum(m.numel() for m in mask.values())
    assert sum(int((m == 0).sum()) for m in mask.values()) == round(0.7 * n)
    assert set(mask) == {k for k in state if k.endswith("weight")}  # codec.targets: weights
    for k, m in mask.items():
        assert torch.all(state[k][m == 0] == 0), k  # still pruned after three rounds of training
        assert torch.any(state[k][m == 1] != 0), k

    # After the exploration every upload and download carries 30 % of the weights plus their positions.
    per_upload = [v for r in rows[1:] for c in r["comm"] for v in c["bytes_up"].values()]
    dense_upload = [v for r in dense[1:] for c in r["comm"] for v in c["bytes_up"].values()]
    assert max(per_upload) < 0.45 * min(dense_upload)
    assert max(v for r in rows[1:] for c in r["comm"] for v in c["bytes_down"].values()) < 0.45 * min(
        v for r in dense for c in r["comm"] for v in c["bytes_down"].values())
    for r in rows:  # the bytes counted are the payloads the codec statistics describe
        assert r["codec_up"]["bytes"] == r["bytes_up"]

    summary = json.loads((Path(tiny_cfg["output_dir"]) / "af" / "summary.json").read_text())
    s = summary["autoflip"]
    assert s["explorers"] == 4 and s["pruned"] == round(0.7 * n) and s["prunable"] == n
    assert s["nonzero_params"] <= s["params"] - s["pruned"]


def test_the_mask_holds_through_a_momentum_server_and_a_lossy_upload(tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "lossy", amount=0.5)
    cfg["federation"]["server_optimizer"] = {"name": "sgd", "lr": 1.0, "momentum": 0.9}
    # asymmetric quantization has no exact zero on its grid: the server must re-apply the mask
    cfg["codec"] = {"up": [{"name": "quantize", "bits": 4, "scheme": "asymmetric"}]}
    Runner(validate(cfg)).run()
    st = _algorithm_state(tiny_cfg, "lossy")
    for k, m in st["mask"].items():
        assert torch.all(st["state"][k][m == 0] == 0), k


def test_explorers_use_explore_epochs_and_later_clients_get_the_mask(tiny_cfg: dict) -> None:
    tiny_cfg["train"]["epochs"] = 1
    runner = Runner(validate(_cfg(tiny_cfg, "plan", explore_epochs=3)))
    runner._build()  # noqa: SLF001
    algo = runner.algo
    algo.setup()
    explore = algo.plan(1, [0, 1])
    assert all(t.train.epochs == 3 and t.param_masks is None for t in explore)
    assert algo.participation(1) is None and algo.participation(2) is None  # explorers default: participation
    runner.backend.close()


def test_the_mask_is_the_same_on_every_backend(tiny_cfg: dict) -> None:
    masks = {}
    for backend in ("serial", "process"):
        cfg = _cfg(tiny_cfg, backend, amount=0.6)
        # One torch thread in both: serial on two threads sums some gradients in another order, and the
        # float-level difference can move a weight across the cut.
        cfg["engine"] = {**cfg["engine"], "backend": backend, "threads": 1}
        Runner(validate(cfg)).run()
        masks[backend] = _algorithm_state(tiny_cfg, backend)["mask"]
        rows = _rows(tiny_cfg, backend)
        masks[backend + "_acc"] = [r["eval"]["global"]["acc"] for r in rows]
    assert masks["serial"].keys() == masks["process"].keys()
    for k in masks["serial"]:
        assert torch.equal(masks["serial"][k], masks["process"][k]), k
    assert masks["serial_acc"] == masks["process_acc"]


def test_start_from_explored_keeps_the_explorers_training(tiny_cfg: dict) -> None:
    tiny_cfg["federation"]["rounds"] = 2
    Runner(validate(_cfg(tiny_cfg, "base", amount=0.3))).run()
    Runner(validate(_cfg(tiny_cfg, "explored", amount=0.3, start_from="explored"))).run()
    a, b = _rows(tiny_cfg, "base"), _rows(tiny_cfg, "explored")
    ma, mb = _algorithm_state(tiny_cfg, "base")["mask"], _algorithm_state(tiny_cfg, "explored")["mask"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the same mask: it comes from the uploads
    assert a[0]["eval"] != b[0]["eval"]  # but another model is pruned: base weights vs their FedAvg


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, tiny_cfg: dict) -> None:
    cfg = _cfg(tiny_cfg, "full", amount=0.5)
    for name, rounds in (("full", 4), ("part", 2)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(dict(cfg, name=name)))
        assert main(["run", str(p), "-q", "--rounds", str(rounds)]) == 0
    assert main(["run", str(tmp_path / "part.yaml"), "-q", "--resume", "--rounds", "4"]) == 0
    out = Path(tiny_cfg["output_dir"])
    assert (out / "part" / "metrics.jsonl").read_bytes() == (out / "full" / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize(("override", "field", "allowed"), [
    ({"params": {"amount": 1.0}}, "algorithm.params.amount", "less than 1"),
    ({"params": {"explorers": 0}}, "algorithm.params.explorers", "greater than 0"),
    ({"params": {"explore_epochs": 0}}, "algorithm.params.explore_epochs", "greater than or equal to 1"),
    ({"params": {"normalize": "zscore"}}, "algorithm.params.normalize", "minmax"),
    ({"params": {"amont": 0.5}}, "amont", "amount"),
])
def test_bad_params_are_refused_naming_the_field(tiny_cfg: dict, override: dict, field: str, allowed: str) -> None:
    cfg = dict(tiny_cfg, algorithm={"name": "autoflip", **override})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert field in str(e.value) and allowed in str(e.value)


def test_one_round_is_refused_before_anything_is_written(tiny_cfg: dict) -> None:
    tiny_cfg["federation"]["rounds"] = 1
    with pytest.raises(ConfigError, match=r"federation.rounds: autoflip explores.*at least 2 rounds \(got 1\)"):
        validate(_cfg(tiny_cfg, "one"))
    assert not Path(tiny_cfg["output_dir"]).exists()


def test_cli_runs_autoflip_and_prints_the_mask(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = tmp_path / "af.yaml"
    p.write_text(yaml.safe_dump(_cfg(tiny_cfg, "cli")))
    assert main(["run", str(p), "--set", "algorithm.params.amount=0.8"]) == 0
    said = capsys.readouterr().out
    assert "autoflip: 2 explorers" in said and "(80.00 %)" in said


def test_an_unevaluated_exploration_round_keeps_its_report_in_the_next_rows_comm(tiny_cfg: dict) -> None:
    tiny_cfg["federation"]["rounds"] = 4
    tiny_cfg["eval"] = {"every": 2}
    Runner(validate(_cfg(tiny_cfg, "every2", amount=0.25))).run()
    rows = _rows(tiny_cfg, "every2")
    assert [r["round"] for r in rows] == [2, 4]
    first = rows[0]["comm"][0]
    assert first["round"] == 1
    assert first["algorithm"] == {"phase": "explore", "mask_sparsity": pytest.approx(0.25, abs=1e-3)}
    assert "phase" not in rows[0]  # the row's own extras are round 2's
