"""``fedslim run CONFIG --resume --rounds N``: a run continued to another last round."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedslim.cli import main


def _write(tmp_path: Path, cfg: dict, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(dict(cfg, name=name)))
    return p


def test_a_finished_run_extended_to_more_rounds_equals_an_uninterrupted_one(tmp_path: Path, tiny_cfg: dict,
                                                                           capsys) -> None:
    tiny_cfg["train"]["schedule"] = {"kind": "step", "gamma": 0.5, "step_size": 2}  # lr by round index only
    out = Path(tiny_cfg["output_dir"])
    full, part = _write(tmp_path, tiny_cfg, "full"), _write(tmp_path, tiny_cfg, "part")
    assert main(["run", str(full), "-q", "--rounds", "5"]) == 0
    assert main(["run", str(part), "-q", "--rounds", "2"]) == 0
    first = (out / "part" / "summary.json").read_bytes()
    assert main(["run", str(part), "--resume", "--rounds", "5"]) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and "federation.rounds 2 -> 5" in said and "summary_round_2.json" in said
    assert (out / "part" / "metrics.jsonl").read_bytes() == (out / "full" / "metrics.jsonl").read_bytes()
    a, b = (json.loads((out / n / "summary.json").read_text()) for n in ("full", "part"))
    assert a | {"name": None} == b | {"name": None}
    # nothing already written is lost: the 2-round summary is kept, and config.yaml says the new total
    assert (out / "part" / "summary_round_2.json").read_bytes() == first
    assert yaml.safe_load((out / "part" / "config.yaml").read_text())["federation"]["rounds"] == 5


def test_an_interrupted_run_may_end_at_another_round(tmp_path: Path, tiny_cfg: dict, kill_run) -> None:
    from fedslim.config import validate
    from fedslim.engine.run import Runner

    tiny_cfg["federation"]["rounds"] = 6
    kill_run(dict(tiny_cfg, name="part"), 3)  # rounds 1-2 done
    short = validate(dict(tiny_cfg, name="part", federation={**tiny_cfg["federation"], "rounds": 4}))
    summary = Runner(short, resume=True).run()
    Runner(validate(dict(tiny_cfg, name="full", federation={**tiny_cfg["federation"], "rounds": 4}))).run()
    out = Path(tiny_cfg["output_dir"])
    assert summary["rounds"] == 4
    assert (out / "part" / "metrics.jsonl").read_bytes() == (out / "full" / "metrics.jsonl").read_bytes()
    assert not list((out / "part").glob("summary_round_*"))  # it had no summary to keep


def test_rounds_already_trained_cannot_be_taken_back(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg, "tiny")
    assert main(["run", str(p), "-q"]) == 0  # 3 rounds
    run = Path(tiny_cfg["output_dir"]) / "tiny"
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    assert main(["run", str(p), "-q", "--resume", "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedslim: --resume: federation.rounds: the run in {run} has already trained 3 rounds; to "
                   f"continue it, give more than 3 (got 2)")
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


def test_a_rounds_change_that_would_rewrite_trained_rounds_is_refused(tmp_path: Path, tiny_cfg: dict,
                                                                     capsys) -> None:
    from tests.test_hybridcomp import _cfg as hybrid_cfg

    cosine = dict(tiny_cfg, train={**tiny_cfg["train"], "schedule": {"kind": "cosine"}})
    hybrid = hybrid_cfg(tiny_cfg)
    for cfg, needle in ((cosine, "train.schedule.kind is cosine"),
                        (hybrid, "algorithm hybridcomp cannot change it: it deploys its compressed models")):
        p = _write(tmp_path, cfg, cfg["name"])
        assert main(["run", str(p), "-q"]) == 0
        run = Path(tiny_cfg["output_dir"]) / cfg["name"]
        before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
        assert main(["run", str(p), "-q", "--resume", "--rounds", "5"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "was planned for 3 rounds and cannot continue to 5" in err, err
        assert len(err.splitlines()) == 1
        assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    # other fields still may not change, rounds or not
    p = _write(tmp_path, tiny_cfg, "other")
    assert main(["run", str(p), "-q"]) == 0
    assert main(["run", str(p), "-q", "--resume", "--rounds", "5", "--set", "train.batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "another config: train.batch_size: 16 in the checkpoint, 8 now" in err


def test_continued_twice_with_eval_every_keeps_each_old_last_row(tmp_path: Path, tiny_cfg: dict) -> None:
    # Each old last round was evaluated (a last round always is); resuming past it must accept that row,
    # not take it for an edited metrics.jsonl, and then write exactly an uninterrupted run's later rows.
    tiny_cfg["eval"] = {"every": 3}
    out = Path(tiny_cfg["output_dir"])
    part, full = _write(tmp_path, tiny_cfg, "part"), _write(tmp_path, tiny_cfg, "full")
    for rounds, extra in (("2", []), ("4", ["--resume"]), ("7", ["--resume"])):
        assert main(["run", str(part), "-q", "--rounds", rounds, *extra]) == 0
    assert main(["run", str(full), "-q", "--rounds", "7"]) == 0
    rows = {n: [json.loads(ln) for ln in (out / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("part", "full")}
    assert [r["round"] for r in rows["part"]] == [2, 3, 4, 6, 7]
    assert [r["round"] for r in rows["full"]] == [3, 6, 7]
    by_round = {r["round"]: r for r in rows["part"]}
    for r in rows["full"]:  # same model and totals; per-row bytes differ only where a row was split
        mine = by_round[r["round"]]
        assert mine["eval"] == r["eval"]
        assert (mine["cum_bytes_up"], mine["sim_time_s"]) == (r["cum_bytes_up"], r["sim_time_s"])
    assert sorted(p.name for p in (out / "part").glob("summary_round_*")) == ["summary_round_2.json",
                                                                             "summary_round_4.json"]
