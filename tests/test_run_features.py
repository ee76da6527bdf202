"""Engine features through real runs: local evaluation per tier, schedules, clipping, data errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedslim.cli import main
from fedslim.config import validate
from fedslim.engine.client import train_procedure
from fedslim.engine.run import Runner


def test_local_eval_reports_every_tier(tiny_cfg: dict) -> None:
    tiny_cfg["data"]["local_test_fraction"] = 0.25
    tiny_cfg["eval"] = {"local": True}
    tiny_cfg["devices"] = {"tiers": [{"name": "phone", "share": 1}, {"name": "sensor", "share": 1}]}
    summary = Runner(validate(tiny_cfg)).run()
    local = summary["local"]
    assert set(local) == {"all", "phone", "sensor"}
    assert local["phone"]["clients"] == 2 and local["sensor"]["clients"] == 2
    # the held-out split is 25 % of 400 samples; every sample is evaluated once
    assert local["all"]["n"] == pytest.approx(100, abs=4)
    assert local["all"]["n"] == local["phone"]["n"] + local["sensor"]["n"]


def test_lr_schedule_reaches_clients(tiny_cfg: dict) -> None:
    tiny_cfg["train"]["schedule"] = {"kind": "exponential", "gamma": 0.5}
    Runner(validate(tiny_cfg)).run()
    rows = [json.loads(x) for x in (Path(tiny_cfg["output_dir"]) / "tiny" / "metrics.jsonl").read_text().split()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025, 0.0125])


def _one_task(tiny_cfg: dict, **train: object):
    tiny_cfg["train"].update(train)
    r = Runner(validate(tiny_cfg))
    r._build()  # noqa: SLF001
    r.algo.setup()
    task = r.algo.plan(1, [0])[0]
    return task, r.ctx.store.get(0), r.backend.buffers.get(task.spec)


def test_grad_clip_bounds_the_update(tiny_cfg: dict) -> None:
    tiny_cfg["train"]["optimizer"] = {"name": "sgd", "lr": 1.0}
    task, data, model = _one_task(tiny_cfg, max_steps=1, grad_clip=0.01)
    res = train_procedure(task, data, model)
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in res.delta.values()))
    assert res.num_steps == 1
    assert float(norm) <= 0.01 * 1.0 + 1e-6


def test_client_update_is_pure(tiny_cfg: dict) -> None:
    task, data, model = _one_task(tiny_cfg)
    a = train_procedure(task, data, model)
    torch.manual_seed(1234)  # unrelated global RNG use must not matter
    b = train_procedure(task, data, model)
    for k in a.delta:
        assert torch.equal(a.delta[k], b.delta[k]), k


def test_corrupt_data_file_is_one_line(tmp_path: Path, shared_data: Path, capsys) -> None:
    root = tmp_path / "data" / "mnist"
    shutil.copytree(shared_data / "mnist", root)
    with gzip.open(shared_data / "mnist" / "train-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(5000)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(head)
    cfg = {"data": {"dataset": "mnist", "root": str(tmp_path / "data")}, "output_dir": str(tmp_path / "runs"),
           "engine": {"progress": False}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-images-idx3-ubyte" in err and "truncated" in err


def test_missing_dataset_says_how_to_download(tmp_path: Path, capsys) -> None:
    assert main(["run", "-q", "--data-dir", str(tmp_path), "--set", "data.dataset=fmnist",
                 "--output-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "fedslim data download" in err


def _run_cli(cfg: dict, tmp_path: Path, *argv: str) -> int:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return main(["run", str(p), "-q", *argv])


def test_pathological_above_the_class_count_is_refused_before_the_run_folder(tiny_cfg: dict, tmp_path: Path,
                                                                             capsys) -> None:
    tiny_cfg["data"]["partition"] = {"kind": "pathological", "classes_per_client": 5}  # 4 classes
    assert _run_cli(tiny_cfg, tmp_path) == 1
    err = capsys.readouterr().err
    assert err == ("fedslim: data.partition.classes_per_client: 5 is more than the 4 classes in the training "
                   "data; use at most 4 (or data.partition.kind=iid)\n")
    assert not Path(tiny_cfg["output_dir"]).exists()


@pytest.mark.parametrize(("model", "shape", "need"), [("vgg16", [1, 8, 8], "at least 32x32"),
                                                      ("alexnet", [1, 3, 3], "at least 4x4"),
                                                      ("lenet5", [1, 3, 3], "at least 4x4")])
def test_model_too_big_for_the_input_names_model_name_and_leaves_no_folder(
        tiny_cfg: dict, tmp_path: Path, capsys, model: str, shape: list[int], need: str) -> None:
    tiny_cfg["model"] = {"name": model}
    tiny_cfg["data"]["options"]["shape"] = shape
    assert _run_cli(tiny_cfg, tmp_path) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fedslim: model.name: '{model}' needs inputs of {need} ")
    assert f"data.dataset 'synthetic' has samples of shape {tuple(shape)}" in err
    fit = err.split("models that fit: ")[1].strip().split(", ")
    assert "mlp" in fit and model not in fit
    assert not Path(tiny_cfg["output_dir"]).exists()


def test_model_that_fails_to_build_leaves_no_run_folder(tiny_cfg: dict, tmp_path: Path, capsys) -> None:
    tiny_cfg["model"] = {"name": "lenet5", "options": {"norm": "xx"}}  # only the model itself checks options
    assert _run_cli(tiny_cfg, tmp_path) == 1
    assert "model.options.norm" in capsys.readouterr().err
    assert not Path(tiny_cfg["output_dir"]).exists()


def test_download_to_a_file_is_refused_before_any_download(tmp_path: Path, capsys) -> None:
    # An unreachable --base-url: were the check gone, nothing would reach the network either.
    unreachable = ["--base-url", "http://127.0.0.1:9"]
    f = tmp_path / "afile"
    f.write_text("kept")
    assert main(["data", "download", "mnist", "--to", str(f), *unreachable]) == 1
    assert capsys.readouterr().err == (f"fedslim: --to {f} is a file; --to must be a directory (the data folder "
                                       f"to download into)\n")
    assert main(["data", "download", "mnist", "--to", str(f / "sub"), *unreachable]) == 1
    assert f"--to {f / 'sub'} cannot be made: {f} is a file; --to must be a directory" in capsys.readouterr().err
    d = tmp_path / "data"
    d.mkdir()
    (d / "mnist").write_text("kept")
    assert main(["data", "download", "mnist", "--to", str(d), *unreachable]) == 1
    assert f"{d / 'mnist'} is a file, not a directory, and mnist's files go into that folder" in capsys.readouterr().err
    assert f.read_text() == "kept" and (d / "mnist").read_text() == "kept" and sorted(tmp_path.iterdir()) == [f, d]
