"""Device tiers as each algorithm reads them: settings an algorithm would ignore (width, capable) are
config errors, and budgets (model_bytes, memory_mb) a tier's model cannot meet are refused before the
run folder is made, naming devices.tiers.N.<field>, the model's size and the algorithms that honour
budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslim.algorithms.hybridcomp import activation_bytes
from fedslim.cli import main
from fedslim.codecs import pack_exact
from fedslim.config import ConfigError, validate
from fedslim.engine.run import Runner
from fedslim.engine.task import ModelSpec

MLP = ModelSpec.make("mlp", 4, (1, 8, 8), 1.0)


def _mlp_bytes(width: float = 1.0) -> int:
    spec = ModelSpec.make("mlp", 4, (1, 8, 8), width)
    return len(pack_exact(spec.build().state_dict()))


def _cfg(tiny_cfg: dict, algo: str, tiers: list[dict], **params: object) -> dict:
    cfg = dict(tiny_cfg, name="dev")
    cfg["federation"] = {"rounds": 1, "participation": 1.0}
    cfg["algorithm"] = {"name": algo, "params": dict(params)}
    cfg["devices"] = {"tiers": tiers}
    return cfg


def _refused(cfg: dict, match: str) -> str:
    """The run is refused with a ConfigError matching ``match``, and no run folder is left behind."""
    with pytest.raises(ConfigError, match=match) as e:
        Runner(validate(cfg)).run()
    assert not (Path(cfg["output_dir"]) / cfg["name"]).exists()
    return str(e.value)


@pytest.mark.parametrize("algo", ["fedavg", "quantfl"])
@pytest.mark.parametrize(("tier", "field"), [({"width": 0.25}, "width"), ({"capable": False}, "capable")])
def test_one_model_algorithms_refuse_tier_settings_they_would_ignore(tiny_cfg, algo, tier, field):
    cfg = _cfg(tiny_cfg, algo, [{"name": "big"}, {"name": "tiny", **tier}])
    with pytest.raises(ConfigError, match=rf"devices\.tiers\.1\.{field}: {algo} ") as e:
        validate(cfg)
    assert "'tiny'" in str(e.value) and "allowed here" in str(e.value)


@pytest.mark.parametrize("algo", ["fedavg", "quantfl"])
def test_one_model_algorithms_refuse_a_tier_that_cannot_hold_the_model(tiny_cfg, algo):
    size = _mlp_bytes()
    cfg = _cfg(tiny_cfg, algo, [{"name": "big"}, {"name": "tiny", "model_bytes": size - 1}])
    msg = _refused(cfg, r"^devices\.tiers\.1\.model_bytes: tier 'tiny' holds at most")
    assert f"{size:,} B" in msg and "hybridcomp" in msg and "heterofl" in msg
    # exactly the model's size is enough
    cfg = _cfg(tiny_cfg, algo, [{"name": "big"}, {"name": "tiny", "model_bytes": size}])
    Runner(validate(cfg)).run()


def test_memory_budget_below_the_model_and_its_activations_is_refused(tiny_cfg):
    need = _mlp_bytes() + activation_bytes(MLP)
    cfg = _cfg(tiny_cfg, "fedavg", [{"name": "big", "memory_mb": 100}, {"name": "t", "memory_mb": (need - 1) / 1e6}])
    msg = _refused(cfg, r"^devices\.tiers\.1\.memory_mb: tier 't' has")
    assert f"at least {need:,} B" in msg
    cfg["devices"]["tiers"][1]["memory_mb"] = need / 1e6
    Runner(validate(cfg)).run()


def test_the_cli_reports_the_refusal_as_a_config_error(tiny_cfg, tmp_path, capsys):
    import yaml

    cfg = _cfg(tiny_cfg, "fedavg", [{"name": "big"}, {"name": "tiny", "memory_mb": 0.01, "model_bytes": 100}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedslim: config error: devices.tiers.1.model_bytes: ") and err.count("\n") == 1
    assert not (Path(cfg["output_dir"]) / "dev").exists()


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "fed_dropout"])
def test_width_algorithms_check_each_tier_against_its_own_sub_model(tiny_cfg, algo):
    half = _mlp_bytes(0.5)  # no BatchNorm in the MLP: the sub-model is the narrow model's weights
    tiers = [{"name": "big"}, {"name": "half", "width": 0.5, "model_bytes": half - 1}]
    msg = _refused(_cfg(tiny_cfg, algo, tiers), r"^devices\.tiers\.1\.model_bytes: tier 'half' holds at most")
    assert f"width-0.5 sub-model of mlp is {half:,} B" in msg
    assert "lower devices.tiers.1.width to 0.25 or less" in msg
    tiers[1]["model_bytes"] = half
    Runner(validate(_cfg(tiny_cfg, algo, tiers))).run()  # fits exactly


def test_model_split_levels_must_fit_every_tier(tiny_cfg):
    # model_split draws levels apart from the tiers: any device may get the largest level
    tiers = [{"name": "big"}, {"name": "small", "model_bytes": _mlp_bytes(0.5)}]
    msg = _refused(_cfg(tiny_cfg, "heterofl", tiers, model_split="a1-b1"), r"^devices\.tiers\.1\.model_bytes: ")
    assert "level 'a' (rate 1)" in msg and "leave model_split unset" in msg


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "fed_dropout"])
def test_width_algorithms_refuse_capable_false(tiny_cfg, algo):
    cfg = _cfg(tiny_cfg, algo, [{"name": "big"}, {"name": "off", "capable": False, "width": 0.5}])
    with pytest.raises(ConfigError, match=rf"^devices\.tiers\.1\.capable: {algo} trains on every device"):
        validate(cfg)


def test_hybridcomp_refuses_widths_and_capable_tiers_that_cannot_hold_the_model(tiny_cfg):
    constrained = {"name": "c", "capable": False, "model_bytes": 10**6}
    with pytest.raises(ConfigError, match=r"^devices\.tiers\.1\.width: hybridcomp "):
        validate(_cfg(tiny_cfg, "hybridcomp", [{"name": "big"}, {**constrained, "width": 0.5}]))
    tiers = [{"name": "big", "model_bytes": _mlp_bytes() - 1}, constrained]
    msg = _refused(_cfg(tiny_cfg, "hybridcomp", tiers, write_rungs=False),
                   r"^devices\.tiers\.0\.model_bytes: tier 'big' holds at most")
    assert "capable: false" in msg


def test_hybridcomp_notes_the_budget_field_it_does_not_read(tiny_cfg):
    tiers = [{"name": "big"}, {"name": "c", "capable": False, "model_bytes": 10**6, "memory_mb": 1}]
    summary = Runner(validate(_cfg(tiny_cfg, "hybridcomp", tiers, amounts=[0.5], write_rungs=False))).run()
    assert any("devices.tiers.1.memory_mb is not read" in n for n in summary["notes"])
