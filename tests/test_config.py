from __future__ import annotations

import pytest

from fedslim.config import ConfigError, RunConfig, apply_override, load_config, validate


def test_defaults_validate() -> None:
    cfg = validate({})
    assert cfg.data.dataset == "digits" and cfg.algorithm.name == "fedavg"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"federation": {"participation": 1.5}}, "federation.participation"),
        ({"federation": {"rounds": "ten"}}, "federation.rounds"),
        ({"train": {"optimizer": {"name": "rmsprop"}}}, "must be one of"),
        ({"data": {"partiton": {}}}, "did you mean 'data.partition'"),
        ({"trian": {}}, "did you mean 'train'"),
        ({"data": {"dataset": "mnits"}}, "did you mean 'mnist'"),
        ({"model": {"name": "lenet"}}, "model.name"),
        ({"algorithm": {"name": "fedav"}}, "did you mean 'fedavg'"),
        ({"data": {"partition": {"kind": "dirichlet", "alpha": 0}}}, "data.partition.alpha"),
        ({"name": "../escape"}, "name"),
        ({"engine": {"ray_address": "10.0.0.1:6379"}}, "engine.ray_address is used only by engine.backend: ray"),
        ({"engine": {"backend": "serial", "ray_workers": 2}}, "engine.ray_workers is used only by"),
        ({"engine": {"backend": "process", "max_group": 4}}, "engine.max_group is used only by engine.backend: "
                                                             "vectorized or auto"),
        ({"engine": {"backend": None}}, "engine.backend: must be one of: auto, process, ray, serial, vectorized"),
        ({"engine": {"backend": {"name": "serial"}}}, "engine.backend: must be one of"),
        ({"engine": {"threads": True}}, "engine.threads"),
        ({"engine": {"threads": 5000}}, "engine.threads: Input should be less than or equal to 1024"),
        ({"engine": {"threads": 10**20}}, "engine.threads"),
        ({"devices": {"tiers": []}}, "devices.tiers: List should have at least 1 item"),
        ({"devices": {"tiers": [{"name": "a", "widht": 0.5}]}}, "did you mean 'devices.tiers.0.width'"),
        ({"devices": {"tiers": [{"name": "a"}, {"name": "b"}, {"name": "a", "width": 0.5}]}},
         "devices.tiers.2.name: tier name 'a' is already used by devices.tiers.0; tier names must be unique"),
        # A misspelt required key: the typo is named, not the key it left missing.
        ({"devices": {"tiers": [{"nme": "a"}]}},
         "devices.tiers.0.nme: unknown key (did you mean 'devices.tiers.0.name'?)"),
        ({"codec": {"up": [{"nme": "quantize"}]}},
         "codec.up.0: 'nme' is not a key (did you mean 'name'?); every stage needs a name, one of int8, prune, "),
        # numpy's Dirichlet draws NaN shares for an infinite concentration.
        ({"data": {"partition": {"kind": "dirichlet", "alpha": float("inf")}}},
         "data.partition.alpha: Input should be a finite number"),
        ({"data": {"partition": {"kind": "quantity", "alpha": float("nan")}}},
         "data.partition.alpha: Input should be a finite number"),
        # Checked across sections, so before a run folder is made; the message starts with the field.
        ({"eval": {"local": True}}, "eval.local: true needs a local test split on every client, but "
                                    "data.local_test_fraction is 0"),
    ],
)
def test_bad_configs_are_one_line_and_name_the_field(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        validate(raw)
    msg = str(ei.value)
    assert expected in msg
    assert "\n" not in msg
    assert "Value error" not in msg  # pydantic's own prefix for a validator's message
    assert "<root>" not in msg


def test_ray_settings_with_the_ray_backend_validate() -> None:
    cfg = validate({"engine": {"backend": "ray", "ray_address": "auto", "ray_workers": 2}})
    assert (cfg.engine.ray_address, cfg.engine.ray_workers) == ("auto", 2)
    for backend in ("vectorized", "auto"):
        assert validate({"engine": {"backend": backend, "max_group": 4}}).engine.max_group == 4


def test_overrides_parse_yaml_scalars() -> None:
    raw: dict = {}
    apply_override(raw, "federation.participation=0.25")
    apply_override(raw, "engine.progress=false")
    apply_override(raw, "data.partition.kind=pathological")
    cfg = validate(raw)
    assert cfg.federation.participation == 0.25
    assert cfg.engine.progress is False
    assert cfg.data.partition.kind == "pathological"


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_override({}, "federation.rounds")


def test_missing_and_broken_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_example_configs_validate() -> None:
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples, "no example configs found"
    for p in examples:
        cfg = load_config(p)
        assert isinstance(cfg, RunConfig), p


def test_config_path_that_is_a_directory_says_so(tmp_path, capsys) -> None:
    from fedslim.cli import main

    with pytest.raises(ConfigError, match="is a directory; expected a YAML config file"):
        load_config(tmp_path)
    out = tmp_path / "runs"
    for argv in (["config", str(tmp_path)], ["run", str(tmp_path), "-q", "--output-dir", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"fedslim: config error: config file '{tmp_path}' is a directory; expected a YAML config file\n"
    assert not out.exists()


def test_set_into_a_default_mapping_joins_the_defaults(tmp_path) -> None:
    from fedslim.algorithms.heterofl import PAPER_RATES

    heterofl = ["algorithm.name=heterofl"]
    cfg = load_config(None, [*heterofl, "algorithm.params.rates.f=0.03125"])
    assert cfg.algorithm.params["rates"] == {**PAPER_RATES, "f": 0.03125}
    # the algorithm is the one named after every override, whatever their order
    cfg = load_config(None, ["algorithm.params.rates.a=0.9", *heterofl])
    assert cfg.algorithm.params["rates"] == {**PAPER_RATES, "a": 0.9}
    # a mapping the config file writes out is the user's own: --set edits it and adds no defaults
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  name: heterofl\n  params:\n    rates: {a: 1.0, b: 0.5}\n    model_split: a1-b1\n")
    cfg = load_config(f, ["algorithm.params.rates.b=0.25"])
    assert cfg.algorithm.params["rates"] == {"a": 1.0, "b": 0.25}
    # a field that is not a mapping, or an algorithm without it, is left to validation
    with pytest.raises(ConfigError, match="algorithm.params"):
        load_config(None, ["algorithm.params.rates.f=0.5"])  # fedavg has no rates


def test_config_command_lists_the_unset_params_defaults(capsys) -> None:
    import yaml

    from fedslim.algorithms.heterofl import HeteroFLParams
    from fedslim.cli import main

    assert main(["config", "--set", "algorithm.name=heterofl", "--set", "algorithm.params.scaler=false"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["algorithm"]["params"] == {"scaler": False}  # defaults are comments, not fields
    comments = [ln for ln in out.splitlines() if ln.startswith("#   ")]
    names = [ln[4:].split(":")[0] for ln in comments]
    assert names == [k for k in HeteroFLParams.model_fields if k != "scaler"]
    assert "#   static_bn: true   # " in out
    assert main(["config"]) == 0  # fedavg takes no params: nothing to list
    assert "#" not in capsys.readouterr().out
