"""End-to-end runs through the CLI entry point: determinism, resume, run folder contents, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fedslim.cli import main
from fedslim.config import validate
from fedslim.engine.run import Runner


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_writes_folder_and_learns(tmp_path: Path, tiny_cfg: dict) -> None:
    tiny_cfg["federation"]["rounds"] = 4
    summary = Runner(validate(tiny_cfg)).run()
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "partition.txt", "partition.png"):
        assert (run / f).exists(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # synthetic blobs are separable: the model must beat chance (0.25) clearly
    assert summary["final"]["global"]["acc"] > 0.6
    assert (summary["name"], summary["seed"]) == ("tiny", 3)
    for key in ("acc", "top4", "f1_macro", "f1_weighted", "precision", "recall", "loss"):
        assert key in rows[-1]["eval"]["global"], key
    # bytes are real payload lengths: float32 exact codec => at least 4 bytes per parameter per client
    params = summary["models"]["global"]["params"]
    assert rows[0]["bytes_up"] >= 2 * 4 * params
    assert rows[-1]["cum_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert sum(rows[0]["comm"][0]["bytes_up"].values()) == rows[0]["bytes_up"]


def test_same_seed_same_bytes(tmp_path: Path, tiny_cfg: dict) -> None:
    outs = []
    for name in ("a", "b"):
        cfg = dict(tiny_cfg, name=name)
        Runner(validate(cfg)).run()
        run = Path(tiny_cfg["output_dir"]) / name
        outs.append(((run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_text()))
    assert outs[0][0] == outs[1][0]
    other = dict(tiny_cfg, name="c", seed=tiny_cfg["seed"] + 1)
    Runner(validate(other)).run()
    assert (Path(tiny_cfg["output_dir"]) / "c" / "metrics.jsonl").read_bytes() != outs[0][0]


def test_resume_matches_uninterrupted(tmp_path: Path, tiny_cfg: dict, kill_run: Callable[[dict, int], None]) -> None:
    tiny_cfg["federation"]["rounds"] = 5
    tiny_cfg["codec"] = {}
    full = dict(tiny_cfg, name="full")
    Runner(validate(full)).run()

    part = dict(tiny_cfg, name="part")
    kill_run(part, 4)  # killed in round 4: rounds 1-3 are recorded
    run = Path(tiny_cfg["output_dir"]) / "part"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    Runner(validate(part), resume=True).run()
    a = (Path(tiny_cfg["output_dir"]) / "full" / "metrics.jsonl").read_bytes()
    b = (run / "metrics.jsonl").read_bytes()
    assert a == b


def test_resume_refuses_other_config(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    code = main(["run", str(p), "-q", "--resume", "--set", "train.batch_size=8"])
    err = capsys.readouterr().err
    assert code == 2 and "another config" in err and "train.batch_size" in err
    # the original run folder is intact
    assert (Path(tiny_cfg["output_dir"]) / "tiny" / "summary.json").exists()


def test_existing_run_is_not_overwritten(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    before = (Path(tiny_cfg["output_dir"]) / "tiny" / "metrics.jsonl").read_bytes()
    assert main(["run", str(p), "-q"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (Path(tiny_cfg["output_dir"]) / "tiny" / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("federation.participation=1.5", "federation.participation"),
        ("federation.partcipation=0.5", "did you mean 'federation.participation'"),
        ("model.name=resnet", "model.name"),
        ("train.epochs=0", "train.epochs"),
    ],
)
def test_cli_config_errors_exit_2_one_line(tmp_path: Path, tiny_cfg: dict, capsys, override: str,
                                           needle: str) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (Path(tiny_cfg["output_dir"]) / "tiny").exists()


def test_report_table_and_plots(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    for name in ("r1", "r2"):
        Runner(validate(dict(tiny_cfg, name=name))).run()
    runs = [str(Path(tiny_cfg["output_dir"]) / n) for n in ("r1", "r2")]
    out_dir = tmp_path / "rep"
    assert main(["report", *runs, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "r2" in out
    assert (out_dir / "accuracy_vs_round.png").stat().st_size > 1000
    assert (out_dir / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (out_dir / "accuracy_vs_sim_time.png").stat().st_size > 1000
    assert main(["report", str(tmp_path)]) == 2


def test_cli_says_fedslim_warnings_in_one_line(tmp_path: Path, tiny_cfg: dict, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedslim.engine.vectorized.available_bytes", lambda _d: 1)  # every group too large
    tiny_cfg["model"] = {"name": "lenet5"}
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", "--set", "engine.backend=vectorized", "--set", "federation.rounds=1"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("fedslim: warning: vectorized backend: a group of 2 lenet5 clients")


def test_list_names_everything(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "mnist", "cifar10", "dirichlet", "pathological", "lenet5", "preresnet18", "fedavg"):
        assert name in out


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path: Path, tiny_cfg: dict, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, tiny_cfg)
    run = Path(tiny_cfg["output_dir"]) / "tiny"

    def interrupted(self: Runner, *a: object, **k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Runner, "_evaluate", interrupted)  # in round 1, before anything is saved
        assert main(["run", str(p), "-q"]) == 130
    assert "starts over when run again" in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists() and (run / "config.yaml").exists()
    # Nothing to resume ...
    assert main(["run", str(p), "-q", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # ... and a plain run starts it over instead of refusing the folder.
    assert main(["run", str(p), "-q"]) == 0
    assert (run / "checkpoint.pt").exists() and (run / "summary.json").exists()
    # A folder holding results is still refused, even with no checkpoint to resume from.
    (run / "checkpoint.pt").unlink()
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["run", str(p), "-q"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    tiny_cfg["output_dir"] = str(blocker)
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q"]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "mine"


def test_resume_without_the_run_config_is_a_one_line_error(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    (run / "config.yaml").unlink()
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["run", str(p), "-q", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is missing or unreadable" in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_run_files_get_the_mode_of_a_plain_write(tmp_path: Path, tiny_cfg: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedslim.results._UMASK", 0o022)  # the umask read when the module was imported
    Runner(validate(tiny_cfg)).run()
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (run / f).stat().st_mode & 0o777 == 0o644, f


def test_report_marks_an_unfinished_run_and_names_it_from_its_config(tmp_path: Path, tiny_cfg: dict,
                                                                     capsys) -> None:
    tiny_cfg["federation"]["rounds"] = 3
    Runner(validate(dict(tiny_cfg, name="done"))).run()
    Runner(validate(dict(tiny_cfg, name="cut"))).run()
    cut = Path(tiny_cfg["output_dir"]) / "cut"
    (cut / "summary.json").unlink()  # what a run stopped before its last round lacks
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(rows[:1]) + "\n")
    capsys.readouterr()  # the runs' own output ('done: ...'), not the report's
    assert main(["report", str(cut.parent / "done"), str(cut), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("cut "))
    algo = tiny_cfg.get("algorithm", {}).get("name", "fedavg")
    assert algo in line and tiny_cfg["model"]["name"] in line and " 1* " in line
    assert "* cut: unfinished, stopped after round 1 of 3" in out
    assert "done:" not in out and "?" not in out


def test_timings_say_which_backend_ran_each_round_of_a_resumed_run(tiny_cfg: dict,
                                                                  kill_run: Callable[[dict, int], None]) -> None:
    from fedslim.results import read_jsonl

    tiny_cfg["federation"]["rounds"] = 3
    kill_run(dict(tiny_cfg, engine={"backend": "serial", "threads": 1}), 3)
    Runner(validate(dict(tiny_cfg, engine={"backend": "vectorized"})), resume=True).run()
    rows = read_jsonl(Path(tiny_cfg["output_dir"]) / "tiny" / "timings.jsonl")
    assert [(r["round"], r["backend"]) for r in rows] == [(1, "serial"), (2, "serial"), (3, "vectorized")]


def test_report_keeps_long_names_whole(tmp_path: Path) -> None:
    from fedslim.report import report

    run = tmp_path / "fed_dropout-mnist-a-e-noniid-long-name"
    run.mkdir()
    m = {"acc": 0.5, "f1_weighted": 0.4}
    row = {"round": 2, "eval": {"a": m, "e": dict(m, acc=0.25)}, "local": {"all": {"acc": 0.75}},
           "cum_bytes_up": 1000, "cum_bytes_down": 2000, "sim_time_s": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (run / "summary.json").write_text(json.dumps({"algorithm": "fed_dropout", "model": "heterofl_cnn"}))
    lines = report([str(run)], str(tmp_path / "rep")).splitlines()
    rows = {ln.split()[0]: ln for ln in lines[2:5]}
    assert set(rows) == {f"{run.name}[a]", f"{run.name}[e]", run.name}
    assert f"{run.name} local/all" in lines[4] and "75.00" in lines[4]
    assert rows[f"{run.name}[e]"].split()[1:3] == ["fed_dropout", "heterofl_cnn"]
    assert "25.00" in rows[f"{run.name}[e]"] and "50.00" in rows[f"{run.name}[a]"]


def test_report_prints_a_runs_traffic_once_not_on_every_level_row(tmp_path: Path) -> None:
    from fedslim.report import report

    run = tmp_path / "hfl"
    run.mkdir()
    m = {"acc": 0.5, "f1_weighted": 0.4}
    row = {"round": 2, "eval": {"a": m, "e": dict(m, acc=0.25)}, "cum_bytes_up": 3_000_000,
           "cum_bytes_down": 4_000_000, "sim_time_s": 12.5}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (run / "summary.json").write_text(json.dumps({"algorithm": "heterofl", "model": "heterofl_cnn"}))
    lines = report([str(run)], str(tmp_path / "rep")).splitlines()
    first, second = lines[2], lines[3]
    assert first.startswith("hfl[a]") and second.startswith("hfl[e]")
    assert "3.0 MB" in first and "4.0 MB" in first and first.rstrip().endswith("12.5")
    assert "MB" not in second and second.rstrip().endswith("40.00")  # ends at f1_w: no run columns
    assert "(up, up x, down and sim s are the whole run's, on its first row)" in lines


def test_printed_table_names_the_topk_measured_and_survives_empty_local_splits(tiny_cfg: dict, capsys) -> None:
    # 4 classes: top-k is capped at top4, so a 'top5' header would misname it. One round: "1 round".
    # One sample per client: every local test split is empty ({"n": 0}, no accuracy): it printed a
    # KeyError traceback after every result had been written.
    tiny_cfg["federation"] = {"rounds": 1, "participation": 1.0}
    tiny_cfg["data"].update(num_clients=4, train_subset=4, local_test_fraction=0.5,
                            partition={"kind": "iid", "min_size": 0})
    tiny_cfg["eval"] = {"local": True}
    tiny_cfg["train"]["batch_size"] = 1
    tiny_cfg["model"]["options"] = {"norm": "none"}
    Runner(validate(tiny_cfg)).run()
    out = capsys.readouterr().out
    assert ", 1 round, 4 clients ->" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("model "))
    assert header.split()[:3] == ["model", "acc", "top4"]
    assert "local/all        -  (clients' own test splits, n=0)" in out


def test_run_whose_reader_closes_stdout_exits_141_and_says_so_on_stderr(tmp_path: Path) -> None:
    # `fedslim run | head -1`: before, a BrokenPipeError traceback (exit 1) at the run's next print.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "fedslim", "run", "-q", "--rounds", "1", "--set",
                             "train.max_steps=1", "--set", "engine.backend=serial", "--output-dir", str(tmp_path),
                             "--name", "piped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves before the results table
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert first.startswith(b"backend serial")
    assert "Traceback" not in err and "stdout was closed (broken pipe)" in err
    assert (tmp_path / "piped" / "summary.json").is_file()  # what the run wrote is kept
