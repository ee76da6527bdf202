"""Device populations: tier names, per-tier local metrics, simulated time per client's own model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner
from fedslim.metrics import mean_metrics
from fedslim.models.profile import profile_spec


@pytest.mark.parametrize(("name", "needle"), [("all", "'all' is reserved"), ("", "non-empty name"),
                                              (" ", "non-empty name")])
def test_reserved_and_empty_tier_names_are_refused(name, needle):
    with pytest.raises(ConfigError, match=rf"^devices\.tiers\.1\.name: .*{needle}"):
        validate({"devices": {"tiers": [{"name": "a"}, {"name": name}]}})


def _two_tier_cfg(tiny_cfg: dict, algo: str, width: float) -> dict:
    cfg = dict(tiny_cfg, name="pop")
    cfg["data"] = {**tiny_cfg["data"], "num_clients": 4, "local_test_fraction": 0.25}
    cfg["eval"] = {"local": True}
    cfg["federation"] = {"rounds": 1, "participation": 1.0}
    cfg["algorithm"] = {"name": algo, "params": {}}
    cfg["devices"] = {"tiers": [
        {"name": "fast", "macs_per_s": 1e9, "up_mbps": 100, "down_mbps": 100},
        {"name": "slow", "width": width, "macs_per_s": 1e5, "up_mbps": 0.1, "down_mbps": 0.2}]}
    return cfg


def test_local_metrics_per_tier_beside_the_mean_over_all_clients(tiny_cfg):
    summary = Runner(validate(_two_tier_cfg(tiny_cfg, "fedavg", 1.0))).run()
    local = summary["local"]
    assert set(local) == {"all", "fast", "slow"}
    assert local["all"]["acc"] == pytest.approx(mean_metrics([local["fast"], local["slow"]])["acc"])


def test_simulated_time_uses_each_clients_own_sub_model_bytes_and_macs(tiny_cfg):
    cfg = _two_tier_cfg(tiny_cfg, "heterofl", 0.5)
    summary = Runner(validate(cfg)).run()
    row = json.loads((Path(cfg["output_dir"]) / "pop" / "metrics.jsonl").read_text().splitlines()[0])
    comm = row["comm"][0]
    # fixed assignment: clients 2 and 3 are the slow tier, training the width-0.5 sub-model
    down, up = comm["bytes_down"]["3"], comm["bytes_up"]["3"]
    assert down == summary["levels"]["slow"]["submodel_bytes"] < summary["levels"]["fast"]["submodel_bytes"]
    macs = profile_spec("mlp", 4, (1, 8, 8), 0.5, scaler_rate=0.5, track_running_stats=False)["macs"]
    samples = 75  # 100 samples per client, a quarter held out for local tests, one epoch
    expect = down * 8 / 0.2e6 + 3 * macs * samples / 1e5 + up * 8 / 0.1e6
    assert comm["sim_time_s"] == pytest.approx(expect)
