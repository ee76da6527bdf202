"""Plugins: a config's ``plugins`` (files relative to the config, or modules), installed packages' entry
points, and the example FedProx plugin (examples/plugins/fedprox.py)."""

from __future__ import annotations

import importlib.metadata
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from fedslim import plugins
from fedslim.cli import main
from fedslim.config import ConfigError, load_config
from fedslim.registry import CLIENT_PROCEDURES, MODELS

ROOT = Path(__file__).resolve().parent.parent
FEDPROX = ROOT / "examples" / "plugins" / "fedprox.py"

# A plugin that registers a model under a name of the test's choosing (registries refuse a name twice).
MODEL_PLUGIN = '''
from fedslim.models.mlp import mlp
from fedslim.registry import MODELS

MODELS.register("{name}", "a test plugin's MLP")(mlp)
'''


def _write(folder: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_fedprox_with_mu_0_is_fedavg_and_runs_on_forked_workers(tmp_path: Path, tiny_cfg: dict) -> None:
    runs = Path(tiny_cfg["output_dir"])
    for name, backend, algo in (("avg", "serial", {"name": "fedavg"}),
                                ("prox", "process", {"name": "fedprox", "params": {"mu": 0.0}})):
        cfg = dict(tiny_cfg, name=name, plugins=[str(FEDPROX)], algorithm=algo,
                   engine={"progress": False, "backend": backend, "threads": 1})
        assert main(["run", str(_write(tmp_path, cfg)), "-q"]) == 0
    saved = yaml.safe_load((runs / "prox" / "config.yaml").read_text())
    assert saved["plugins"] == [str(FEDPROX)] and saved["algorithm"]["name"] == "fedprox"
    # The plugin's own procedure ran (in the process backend's workers): with mu 0 it is FedAvg's step.
    assert (runs / "prox" / "metrics.jsonl").read_bytes() == (runs / "avg" / "metrics.jsonl").read_bytes()


def test_fedprox_proximal_term_keeps_the_update_near_the_global_model(toy_tasks: tuple) -> None:
    plugins.load_plugin(str(FEDPROX))
    store, tasks = toy_tasks
    proc = CLIENT_PROCEDURES.get("fedprox_train")
    task = tasks[0]
    norms = {}
    for mu in (0.0, 1.0, 100.0):
        task.extras = {"mu": mu}
        model = task.spec.build()
        delta = proc(task, store.get(task.client, "train"), model).delta
        norms[mu] = torch.sqrt(sum((d.float() ** 2).sum() for d in delta.values())).item()
    assert norms[0.0] > norms[1.0] > norms[100.0] > 0


def test_a_plugin_file_is_found_relative_to_its_config(tmp_path: Path, tiny_cfg: dict) -> None:
    name = f"mlp_{uuid.uuid4().hex[:8]}"
    (tmp_path / "conf" / "ext").mkdir(parents=True)
    (tmp_path / "conf" / "ext" / "mymodel.py").write_text(MODEL_PLUGIN.format(name=name))
    cfg = dict(tiny_cfg, plugins=["ext/mymodel.py"], model={"name": name})
    p = _write(tmp_path / "conf", cfg)
    loaded = load_config(p)
    assert loaded.plugins == [str((tmp_path / "conf" / "ext" / "mymodel.py").resolve())]
    assert name in MODELS
    # From any folder: the path is the config's, not the current folder's.
    assert main(["run", str(p), "-q", "--rounds", "1"]) == 0
    assert yaml.safe_load((Path(tiny_cfg["output_dir"]) / "tiny" / "config.yaml").read_text())["model"]["name"] == name


@pytest.mark.parametrize(("plugin", "match"), [
    ("missing.py", r"^plugins\.0: no plugin file '.*missing\.py'; allowed: an existing Python file"),
    ("no_such_module_xyz", r"^plugins\.0: importing the plugin module 'no_such_module_xyz' failed: "
                           r"ModuleNotFoundError"),
    ("broken.py", r"^plugins\.0: importing the plugin file '.*broken\.py' failed: ZeroDivisionError"),
    ("twice.py", r"^plugins\.0: importing the plugin file .* failed: ValueError: model 'mlp' registered twice"),
])
def test_a_plugin_that_cannot_be_imported_is_a_config_error(tmp_path: Path, tiny_cfg: dict, capsys,
                                                            plugin: str, match: str) -> None:
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "twice.py").write_text(MODEL_PLUGIN.format(name="mlp"))
    p = _write(tmp_path, dict(tiny_cfg, plugins=[plugin]))
    with pytest.raises(ConfigError, match=match):
        load_config(p)
    assert main(["run", str(p), "-q"]) == 2
    assert capsys.readouterr().err.startswith("fedslim: config error: plugins.0: ")
    assert not Path(tiny_cfg["output_dir"]).exists()


def test_a_failed_plugin_file_can_be_fixed_and_loaded(tmp_path: Path, tiny_cfg: dict) -> None:
    name = f"mlp_{uuid.uuid4().hex[:8]}"
    f = tmp_path / "late.py"
    f.write_text("raise RuntimeError('not yet')\n")
    with pytest.raises(ConfigError, match="RuntimeError: not yet"):
        plugins.load_plugin(str(f))
    assert plugins.file_module_name(f) not in sys.modules  # no half-imported module left behind
    f.write_text(MODEL_PLUGIN.format(name=name))
    plugins.load_plugin(str(f))
    assert name in MODELS


def test_installed_packages_plugins_load_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mlp_{uuid.uuid4().hex[:8]}"
    module = f"ep_plugin_{name}"
    (tmp_path / f"{module}.py").write_text(MODEL_PLUGIN.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    good = importlib.metadata.EntryPoint(name="mine", value=module, group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [good] if group == "fedslim.plugins" else [])
    assert plugins.load_entry_point_plugins() == ["mine"]
    assert name in MODELS
    bad = importlib.metadata.EntryPoint(name="broken", value="no_such_module_abc", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [bad])
    with pytest.raises(ConfigError, match=r"the installed plugin 'broken' \(no_such_module_abc, .* "
                                          r"ModuleNotFoundError"):
        plugins.load_entry_point_plugins()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fedprox_term_reaches_every_weight_of_the_engines_lenet_buffer(channels_last: bool) -> None:
    # The engine trains LeNet-5 on one flat tensor, its narrow convolutions stored padded (and channels-last
    # on this CPU): the proximal term must still pull every weight, and no layout warning reach the user.
    import warnings

    from fedslim.config import OptimizerConfig
    from fedslim.data.types import DatasetBundle, TensorData
    from fedslim.engine.backends import ModelBuffers
    from fedslim.engine.store import ClientStore
    from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec

    plugins.load_plugin(str(FEDPROX))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g)
    store = ClientStore(DatasetBundle("t", TensorData(x, y), TensorData(x[:4], y[:4]), 10, (1, 28, 28)),
                        [torch.arange(256)])
    spec = ModelSpec.make("lenet5", 10, (1, 28, 28))
    torch.manual_seed(0)
    state = spec.build().state_dict()
    buffers = ModelBuffers("cpu", channels_last=channels_last)
    norms = {}
    for mu in (0.0, 50.0):
        task = ClientTask(client=0, round=1, spec=spec, state=state, seed=1, kind="fedprox_train", extras={"mu": mu},
                          train=LocalTrain(2, 32, OptimizerConfig(name="sgd", lr=0.01), 0.01))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            delta = CLIENT_PROCEDURES.get("fedprox_train")(task, store.get(0, "train"), buffers.get(spec)).delta
        norms[mu] = {k: v.norm().item() for k, v in delta.items() if k.endswith("weight")}
    assert set(norms[0.0]) == {"features.0.weight", "features.5.weight", "fc.0.weight", "fc.3.weight",
                               "classifier.weight"}
    for k, n in norms[50.0].items():
        assert 0 < n < 0.5 * norms[0.0][k], k


def test_list_shows_what_a_plugin_registers(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mlp_{uuid.uuid4().hex[:8]}"
    (tmp_path / "mine.py").write_text(MODEL_PLUGIN.format(name=name))
    monkeypatch.chdir(tmp_path)  # a file given to --plugin is relative to the current folder
    assert main(["list", "models", "--plugin", "mine.py"]) == 0
    assert f"  {name} " in capsys.readouterr().out
    assert main(["list", "--plugin", "absent.py"]) == 2
    assert "fedslim: config error: --plugin: no plugin file " in capsys.readouterr().err
