"""The engine as a user drives it from the CLI: resume, run folders, simulated time (QA findings)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fedslim.cli import main


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _killed_run(tmp_path: Path, tiny_cfg: dict, kill_run: Callable[[dict, int], None], rounds: int = 5,
                killed_in: int = 4) -> tuple[Path, Path]:
    tiny_cfg["federation"]["rounds"] = rounds
    kill_run(tiny_cfg, killed_in)
    return _write(tmp_path, tiny_cfg), Path(tiny_cfg["output_dir"]) / tiny_cfg["name"]


@pytest.mark.parametrize("damage", ["torn", "missing", "middle_row_lost"])
def test_resume_refuses_a_metrics_file_that_lost_rows(tmp_path: Path, tiny_cfg: dict, kill_run, capsys,
                                                        damage: str) -> None:
    p, run = _killed_run(tmp_path, tiny_cfg, kill_run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    if damage == "torn":  # a copy cut short: the last row half there
        metrics.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    elif damage == "missing":
        metrics.unlink()
    else:
        metrics.write_text(lines[0] + lines[2])
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    assert main(["run", str(p), "-q", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "checkpoint is at round 3" in err and "rounds 1-3" in err, err
    # Nothing written was replaced: the run can still be resumed once the file is restored.
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


def test_resume_with_every_row_still_works_with_eval_every(tmp_path: Path, tiny_cfg: dict, kill_run) -> None:
    tiny_cfg["eval"] = {"every": 2}
    p, run = _killed_run(tmp_path, tiny_cfg, kill_run, rounds=5, killed_in=5)
    assert [yaml.safe_load(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert main(["run", str(p), "-q", "--resume"]) == 0
    assert [yaml.safe_load(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 5]


def test_rounds_zero_on_the_command_line_is_refused_not_ignored(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    # `--rounds 0` used to be dropped for being falsy: the config's 3 rounds ran instead.
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", "--rounds", "0"]) == 2
    assert "federation.rounds" in capsys.readouterr().err
    assert not (Path(tiny_cfg["output_dir"]) / "tiny").exists()


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in run.iterdir()}
    capsys.readouterr()
    assert main(["run", str(p), "-q", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished all 3 rounds; nothing to resume" in out and "at round 4" not in out, out
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in run.iterdir()} == before


def test_resume_finishes_a_run_killed_after_its_last_checkpoint(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    summary = (run / "summary.json").read_bytes()
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    capsys.readouterr()
    assert main(["run", str(p), "-q", "--resume"]) == 0
    assert "all 3 rounds are done, finishing the run" in capsys.readouterr().out
    assert (run / "summary.json").read_bytes() == summary


def test_checkpoint_of_another_config_names_the_field(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    # config.yaml says seed 4 (edited, or copied from another run) but the checkpoint was written with seed 3.
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    cfg_file = Path(tiny_cfg["output_dir"]) / "tiny" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("seed: 3", "seed: 4"))
    assert main(["run", str(p), "-q", "--resume", "--set", "seed=4"]) == 2
    err = capsys.readouterr().err
    assert "another config: seed: 3 in the checkpoint, 4 now" in err, err


def test_runner_prints_to_the_stdout_of_the_moment(tiny_cfg: dict, capsys) -> None:
    import contextlib
    import io

    from fedslim.config import validate
    from fedslim.engine.run import Runner

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        Runner(validate(tiny_cfg)).run()
    assert "tiny: fedavg / mlp / synthetic, 3 rounds" in buf.getvalue()
    assert "tiny: fedavg" not in capsys.readouterr().out


def test_a_moved_and_renamed_run_folder_resumes(tmp_path: Path, tiny_cfg: dict, kill_run) -> None:
    import shutil

    tiny_cfg["federation"]["rounds"] = 4
    full = dict(tiny_cfg, name="full")
    assert main(["run", str(_write(tmp_path, full)), "-q"]) == 0
    kill_run(tiny_cfg, 3)
    moved = tmp_path / "elsewhere"
    shutil.move(Path(tiny_cfg["output_dir"]) / "tiny", moved / "renamed")
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", "--resume", "--output-dir", str(moved), "--name", "renamed"]) == 0
    assert (moved / "renamed" / "metrics.jsonl").read_bytes() == (
        Path(tiny_cfg["output_dir"]) / "full" / "metrics.jsonl").read_bytes()


def test_a_checkpoint_that_saved_name_and_output_dir_still_resumes(tmp_path: Path, tiny_cfg: dict, kill_run) -> None:
    # Checkpoints written before name and data.root stopped being compared hold them in their config.
    import torch

    tiny_cfg["federation"]["rounds"] = 4
    kill_run(tiny_cfg, 3)
    ck_path = Path(tiny_cfg["output_dir"]) / "tiny" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    ck["config"]["name"] = "tiny"
    ck["config"]["data"]["root"] = None
    torch.save(ck, ck_path)
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q", "--resume"]) == 0


def test_a_torch_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    import torch

    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    torch.save([1, 2], Path(tiny_cfg["output_dir"]) / "tiny" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["run", str(p), "-q", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt: not a fedslim checkpoint (it holds a list, not a run's state); the run cannot " in err, err


def test_a_truncated_checkpoint_is_refused_with_what_to_do(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q"]) == 0
    ck = Path(tiny_cfg["output_dir"]) / "tiny" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:500])
    capsys.readouterr()
    assert main(["run", str(p), "-q", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedslim: --resume: ") and "not a readable fedslim checkpoint" in err, err
    assert err.endswith("the run cannot continue from it (restore the file, or start over under another name)")


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    tiny_cfg["output_dir"] = "/proc/fedslim-no-such-folder"  # no folder can be made in /proc, even by root
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedslim: output_dir: cannot create the run folder /proc/fedslim-no-such-folder/tiny"), err


@pytest.mark.parametrize("backend", ["serial", "vectorized", "ray"])
def test_a_one_sample_batch_on_batchnorm_is_refused_alike_by_every_backend(tmp_path: Path, tiny_cfg: dict, capsys,
                                                                           backend: str) -> None:
    # MLP with BatchNorm1d, batches of one sample: torch cannot take batch statistics of one value per
    # channel. serial said only torch's "Expected more than 1 value per channel ..."; vectorized (masked
    # statistics) trained the clients anyway, so the backends disagreed; ray wrapped it in its actor
    # header (colour codes, a remote traceback) over several lines.
    if backend == "ray":
        pytest.importorskip("ray")
    tiny_cfg["model"] = {"name": "mlp", "options": {"norm": "bn"}}
    tiny_cfg["train"]["batch_size"] = 1
    tiny_cfg["federation"]["rounds"] = 1
    tiny_cfg["engine"]["backend"] = backend
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "(round 1): a batch of one sample cannot train mlp" in err and "train.batch_size is 1" in err, err
    assert len(err.splitlines()) == 1 and err.startswith("fedslim: client "), err


def test_ray_not_installed_is_one_line_with_the_install_command(tmp_path: Path, tiny_cfg: dict, capsys,
                                                                 monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    tiny_cfg["engine"]["backend"] = "ray"
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedslim: engine.backend 'ray' needs Ray: pip install 'fedslim[ray]' (or pip install 'ray>=2.9')"
    assert not (Path(tiny_cfg["output_dir"]) / "tiny").exists()


def test_checkpoints_between_evaluated_rounds_resume_to_the_same_metrics(tmp_path: Path, tiny_cfg: dict) -> None:
    # eval.every 3 with checkpoint_every 1 (the default) checkpointed only at evaluated rounds: a run
    # killed in round 5 had to go back to round 3, and in round 2 had nothing to resume at all.
    import torch

    tiny_cfg["federation"]["rounds"] = 5
    tiny_cfg["eval"] = {"every": 3}
    tiny_cfg["codec"] = {"up": [{"name": "topk", "ratio": 0.2}], "down": [{"name": "int8"}]}
    assert main(["run", str(_write(tmp_path, dict(tiny_cfg, name="full"))), "-q"]) == 0
    part = dict(tiny_cfg, name="part")
    p = _write(tmp_path, part)
    run = Path(tiny_cfg["output_dir"]) / "part"

    class Killed(Exception):
        pass

    from fedslim.config import validate
    from fedslim.engine.run import Runner

    runner = Runner(validate(part))
    original = runner._sim_time  # noqa: SLF001

    def sim_time(rnd: int, *a: object) -> float:
        if rnd == 3:  # inside round 3, before its row: rounds 1-2 done, none of them evaluated
            raise Killed
        return original(rnd, *a)

    runner._sim_time = sim_time  # type: ignore[method-assign]
    with pytest.raises(Killed):
        runner.run()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["round"] == 2
    assert not (run / "metrics.jsonl").exists()
    assert main(["run", str(p), "-q", "--resume"]) == 0
    full = Path(tiny_cfg["output_dir"]) / "full"
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_temporaries_of_a_killed_write_are_removed_on_resume(tmp_path: Path, tiny_cfg: dict, kill_run) -> None:
    p, run = _killed_run(tmp_path, tiny_cfg, kill_run)
    stale = run / ".checkpoint.pt.k3j_x9.tmp"  # what atomic_write_bytes leaves when killed mid-write
    stale.write_bytes(b"x" * 1000)
    mine = run / "notes.tmp"  # not ours: kept
    mine.write_text("user file")
    assert main(["run", str(p), "-q", "--resume"]) == 0
    assert not stale.exists() and mine.exists()


def test_max_group_that_auto_ignores_on_a_cpu_is_said(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    tiny_cfg["engine"].update(backend="auto", max_group=4, device="cpu")
    tiny_cfg["federation"]["rounds"] = 1
    assert main(["run", str(_write(tmp_path, tiny_cfg)), "-q"]) == 0
    err = capsys.readouterr().err
    assert "engine.max_group=4 is used by the vectorized backend only, and engine.backend auto picked" in err, err


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path: Path, tiny_cfg: dict, kill_run, capsys) -> None:
    # Two runs of one folder (the same config started twice, or --resume while it still runs) both
    # wrote metrics.jsonl and checkpoint.pt, each rewriting the other's.
    import fcntl
    import os

    p, run = _killed_run(tmp_path, tiny_cfg, kill_run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if not f.name.startswith(".")}
    fd = os.open(run / ".fedslim.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the running one holds
    try:
        assert main(["run", str(p), "-q", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "is in use by another fedslim run" in err, err
        assert {f.name: f.read_bytes() for f in run.iterdir() if not f.name.startswith(".")} == before
    finally:
        os.close(fd)
    assert main(["run", str(p), "-q", "--resume"]) == 0  # once it has ended
