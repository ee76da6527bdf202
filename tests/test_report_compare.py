"""Comparing runs: ``fedslim run --seeds``, and in ``fedslim report`` the tables over seeds and to a
target accuracy, and the CSV export."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from fedslim.cli import main


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _final_accs(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [rows[-1]["eval"]["global"]["acc"] * 100]


def _seed_row(out: str, name: str) -> list[str]:
    """The cells of the row of ``name`` in the table over seeds (the acc cell as 'mean ± sd')."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Runs whose configs differ only in their seed"))
    row = next(ln for ln in lines[start:] if ln.startswith(name + " "))
    return row.replace(" ± ", "±").split()


def test_run_seeds_writes_a_folder_per_seed_and_the_spread_over_them(tmp_path: Path, tiny_cfg: dict,
                                                                     capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", "--seeds", "0", "1", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    runs = [Path(tiny_cfg["output_dir"]) / f"tiny-seed{s}" for s in (0, 1, 2)]
    for s, run in zip((0, 1, 2), runs, strict=True):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["seed"], saved["name"], saved["federation"]["rounds"]) == (s, f"tiny-seed{s}", 2)
        assert (run / "summary.json").exists()
    accs = [_final_accs(r)[0] for r in runs]
    assert len(set(accs)) > 1  # the seeds really differ: another split and another start
    cells = _seed_row(out, "tiny-seed*")
    assert cells[1:4] == ["fedavg", "3", "0,1,2"]
    mean, sd = (float(v) for v in cells[4].split("±"))
    assert mean == pytest.approx(statistics.fmean(accs), abs=0.006)
    assert sd == pytest.approx(statistics.stdev(accs), abs=0.006)

    # Run again: every folder is checked before anything trains, so seed 3's is not even made.
    before = (runs[0] / "metrics.jsonl").read_bytes()
    assert main(["run", str(p), "-q", "--seeds", "3", "0", "--rounds", "2"]) == 2
    assert "tiny-seed0 already holds a run" in capsys.readouterr().err
    assert not (Path(tiny_cfg["output_dir"]) / "tiny-seed3").exists()

    # --resume leaves the finished seeds as they are and runs the new one.
    assert main(["run", str(p), "-q", "--seeds", "0", "1", "2", "3", "--rounds", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert (runs[0] / "metrics.jsonl").read_bytes() == before
    assert "already finished all 2 rounds" in out
    assert _seed_row(out, "tiny-seed*")[2:4] == ["4", "0,1,2,3"]


@pytest.mark.parametrize(("args", "match"), [
    (["--seeds", "1", "1"], "seed 1 is given twice"),
    (["--seeds", "1", "--set", "seed=2"], "--set seed=... sets the seed too"),
    (["--seeds", "-1"], "-1 is not a seed; allowed: integers >= 0"),
])
def test_run_seeds_refuses_bad_seeds_before_any_run(tmp_path: Path, tiny_cfg: dict, capsys, args: list[str],
                                                    match: str) -> None:
    p = _write(tmp_path, tiny_cfg)
    assert main(["run", str(p), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("fedslim: config error: --seeds: ")
    assert not Path(tiny_cfg["output_dir"]).exists()


def test_report_groups_only_runs_that_differ_in_their_seed(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    out_dir = Path(tiny_cfg["output_dir"])
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "2"]) == 0
    # Another learning rate on seed 4: a config of its own, so in no group.
    assert main(["run", str(p), "-q", "--rounds", "2", "--set", "seed=4", "--name", "lr",
                 "--set", "train.optimizer.lr=0.2"]) == 0
    # A copy of seed 5's folder: the same config and seed, so the same numbers, counted once.
    shutil.copytree(out_dir / "tiny-seed5", out_dir / "copy")
    # A run stopped before its last round is no finished draw: left out of the group.
    shutil.copytree(out_dir / "tiny-seed5", out_dir / "stopped")
    (out_dir / "stopped" / "summary.json").unlink()
    cfg = yaml.safe_load((out_dir / "stopped" / "config.yaml").read_text())
    (out_dir / "stopped" / "config.yaml").write_text(yaml.safe_dump(dict(cfg, seed=6)))
    capsys.readouterr()
    runs = [str(out_dir / n) for n in ("tiny-seed4", "tiny-seed5", "lr", "copy", "stopped")]
    assert main(["report", *runs, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    cells = _seed_row(out, "tiny-seed*")
    assert cells[2:4] == ["2", "4,5"]
    accs = [_final_accs(out_dir / f"tiny-seed{s}")[0] for s in (4, 5)]
    assert float(cells[4].split("±")[0]) == pytest.approx(statistics.fmean(accs), abs=0.006)
    assert "copy repeats tiny-seed5 (seed 5, same config): counted once" in out
    assert not any(ln.startswith("lr ") for ln in out.split("differ only in their seed")[1].splitlines())
    assert (tmp_path / "plots" / "accuracy_over_seeds.png").stat().st_size > 0

    # No two runs of one config: no table over seeds.
    assert main(["report", str(out_dir / "tiny-seed4"), str(out_dir / "lr"), "--out", str(tmp_path / "p2")]) == 0
    assert "differ only in their seed" not in capsys.readouterr().out
    assert not (tmp_path / "p2" / "accuracy_over_seeds.png").exists()


def test_report_pairs_seed_groups_by_seed_where_the_draw_is_the_same(tmp_path: Path, tiny_cfg: dict,
                                                                     capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    out_dir = Path(tiny_cfg["output_dir"])
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "2"]) == 0
    # Another learning rate: the same split, devices, initial model and cohorts, seed by seed.
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "2", "--name", "fast",
                 "--set", "train.optimizer.lr=0.2"]) == 0
    # Another number of rounds: another federation, so seed 4 is not the same draw.
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "3", "--name", "long"]) == 0
    capsys.readouterr()
    runs = [str(out_dir / f"{n}-seed{s}") for n in ("tiny", "fast", "long") for s in (4, 5)]
    assert main(["report", *runs, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    diffs = [_final_accs(out_dir / f"fast-seed{s}")[0] - _final_accs(out_dir / f"tiny-seed{s}")[0] for s in (4, 5)]
    assert len(set(diffs)) > 1  # not one draw shifted: the per-seed differences vary
    line = next(ln for ln in out.splitlines() if ln.startswith("fast-seed* - tiny-seed*: "))
    mean, sd = (float(v) for v in line.split(": ")[1].split(" points")[0].split(" ± "))
    assert mean == pytest.approx(statistics.fmean(diffs), abs=0.006)
    assert sd == pytest.approx(statistics.stdev(diffs), abs=0.006)
    low, high = (float(v) for v in line.split("95 % CI ")[1].split(" (")[0].split(" to "))
    half = 12.7062 * statistics.stdev(diffs) / 2 ** 0.5  # Student's t, 1 degree of freedom, 97.5 %
    assert (low, high) == (pytest.approx(statistics.fmean(diffs) - half, abs=0.006),
                           pytest.approx(statistics.fmean(diffs) + half, abs=0.006))
    assert "long-seed* - tiny-seed*: not paired, they differ in federation " in out


def test_report_target_gives_the_round_bytes_and_time_to_an_accuracy(tmp_path: Path, tiny_cfg: dict,
                                                                     capsys) -> None:
    p = _write(tmp_path, tiny_cfg)
    out_dir = Path(tiny_cfg["output_dir"])
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "3"]) == 0
    runs = [out_dir / f"tiny-seed{s}" for s in (4, 5)]
    rows = {r.name: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs}
    accs = {n: [row["eval"]["global"]["acc"] * 100 for row in rs] for n, rs in rows.items()}
    # Reached by both, at a round each finds for itself.
    target = round(min(max(a) for a in accs.values()) - 0.005, 2)
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "plots"), "--target", str(target)]) == 0
    out = capsys.readouterr().out
    table = out.split(f"To {target:g} % test accuracy")[1].splitlines()
    hits = {}
    for name, rs in rows.items():
        hit = next(r for r, a in zip(rs, accs[name], strict=True) if a >= target)
        hits[name] = hit
        cells = next(ln for ln in table if ln.startswith(name + " ")).split()
        assert cells[1] == str(hit["round"])
        assert cells[-1] == f"{hit['sim_time_s']:.1f}"
    mean_round = statistics.fmean(h["round"] for h in hits.values())
    assert next(ln for ln in table if ln.startswith("tiny-seed* (mean of 2)")).split()[4] == f"{mean_round:.1f}"
    # Reached by none: each run says its best, and the group how many reached it.
    top = max(max(a) for a in accs.values()) + 1
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "plots"), "--target", f"{top:.2f}"]) == 0
    out = capsys.readouterr().out
    assert "tiny-seed4 " in out and f"not reached (best {max(accs['tiny-seed4']):.2f} by round 3)" in out
    assert "reached by 0 of 2 seeds" in out
    assert main(["report", str(runs[0]), "--target", "101"]) == 2
    assert "--target: 101 is not a test accuracy; allowed: a percentage, 0 < ACC <= 100" in capsys.readouterr().err


def test_report_csv_has_a_row_per_run_and_evaluated_model(tmp_path: Path, tiny_cfg: dict, capsys) -> None:
    import csv

    p = _write(tmp_path, tiny_cfg)
    out_dir = Path(tiny_cfg["output_dir"])
    assert main(["run", str(p), "-q", "--seeds", "4", "5", "--rounds", "2", "--set", "eval.local=true",
                 "--set", "data.local_test_fraction=0.2"]) == 0
    runs = [out_dir / f"tiny-seed{s}" for s in (4, 5)]
    target = tmp_path / "tables" / "runs.csv"
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "plots"), "--csv", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    got = list(csv.DictReader(target.open()))
    want = []
    for s, run in zip((4, 5), runs, strict=True):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        for name, m in [*last["eval"].items(), *((f"local/{k}", v) for k, v in last["local"].items())]:
            want.append((f"tiny-seed{s}", str(s), name, str(last["round"]), str(m["acc"]), str(last["cum_bytes_up"])))
        assert [r["best_acc"] for r in got if r["run"] == f"tiny-seed{s}" and r["evaluated"] == "global"] == [
            str(max(r["eval"]["global"]["acc"] for r in rows))]
    assert [(r["run"], r["seed"], r["evaluated"], r["round"], r["acc"], r["bytes_up"]) for r in got] == want
    assert {"f1_macro", "f1_weighted", "precision", "recall", "loss", "sim_time_s"} <= set(got[0])
    assert (tmp_path / "plots" / "accuracy_vs_sim_time.png").stat().st_size > 1000

    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "x.csv")  # under a file: no folder can be made
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "plots"), "--csv", bad]) == 2
    assert capsys.readouterr().err.startswith("fedslim: --csv: cannot write ")
