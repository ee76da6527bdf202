"""``fedslim report``: compare run folders in one table (and over seeds, to a target accuracy, as CSV)
and plot accuracy against rounds, bytes and simulated time."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from fedslim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write_bytes, atomic_write_text, read_jsonl
from fedslim.seed_stats import SeedGroup, paired_differences, seed_and_rest, seed_groups, seed_table
from fedslim.tables import columns, fmt_bytes


class ReportError(ValueError):
    pass


def load_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = read_jsonl(run / METRICS_FILE)
    if not rows:
        raise ReportError(f"{run}: no {METRICS_FILE} with rows (is this a fedslim run folder?)")
    summary_path = run / SUMMARY_FILE
    if summary_path.exists():
        return json.loads(summary_path.read_text()), rows
    # No summary: the run stopped before its last round. Its config still says what it was.
    summary: dict[str, Any] = {"name": run.name, "unfinished": True}
    try:
        cfg = yaml.safe_load((run / CONFIG_FILE).read_text()) or {}
        summary |= {"algorithm": cfg["algorithm"]["name"], "model": cfg["model"]["name"],
                    "rounds": cfg["federation"]["rounds"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    return summary, rows


def _up_ratio(summary: dict[str, Any]) -> str:
    """How many times smaller than float32 the uploads were (summed over the run), from real bytes."""
    c = summary.get("codec_up") or {}
    r = c.get("ratio_vs_float32")
    return f"{r:.2f}" if r else "-"


def run_labels(paths: list[Path]) -> list[str]:
    """A label per run folder: its name, or where names repeat (runs/a/run, runs/b/run), the shortest
    trailing part of its path that no other run shares ('a/run', 'b/run')."""
    parts = [p.resolve().parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i and q != mine]
        k = 1
        while k < len(mine) and any(q[-k:] == mine[-k:] for q in others):
            k += 1
        labels.append("/".join(mine[-k:]))
    return labels


def report(runs: list[str], out_dir: str | None = None, target: float | None = None,
           csv_path: str | None = None) -> str:
    if target is not None and not 0 < target <= 100:
        raise ReportError(f"--target: {target:g} is not a test accuracy; allowed: a percentage, 0 < ACC <= 100")
    paths = [Path(r) for r in runs]
    for p in paths:
        if not p.is_dir():
            raise ReportError(f"{p}: not a folder")
    loaded = [(p, *load_run(p)) for p in paths]
    label_of = dict(zip(paths, run_labels(paths), strict=True))
    # Columns as wide as their longest entry: a truncated name can hide the level or tier that tells
    # two rows of one run apart.
    named = [(p, s, rows, [label_of[p] if label == "global" else f"{label_of[p]}[{label}]"
                           for label in rows[-1].get("eval", {})]
              + [f"{label_of[p]} local/{tier}" for tier in rows[-1].get("local") or {}]) for p, s, rows in loaded]
    wn = max([3, *(len(n) for *_, names in named for n in names)])
    wa = max([4, *(len(str(s.get("algorithm", "?"))) for _, s, _ in loaded)])
    wm = max([5, *(len(str(s.get("model", "?"))) for _, s, _ in loaded)])
    header = (f"{'run':<{wn}} {'algo':<{wa}} {'model':<{wm}} {'rnd':>4} {'acc':>7} {'best':>7} {'f1_w':>7} "
              f"{'up':>10} {'up x':>6} {'down':>10} {'sim s':>8}")
    lines = [header, "-" * len(header)]
    shared_row = False
    for _p, s, rows, names in named:
        last = rows[-1]
        evals = list(last.get("eval", {}).items())
        rnd = f"{last['round']}*" if s.get("unfinished") else str(last["round"])
        run_cols = (f" {fmt_bytes(last['cum_bytes_up']):>10} {_up_ratio(s):>6} "
                    f"{fmt_bytes(last['cum_bytes_down']):>10} {last.get('sim_time_s', 0):8.1f}")
        for i, (name, (label, m)) in enumerate(zip(names, evals, strict=False)):
            best = max(r["eval"][label]["acc"] for r in rows if label in r.get("eval", {}))
            # Traffic and time belong to the whole run, not to one of its evaluated models (levels,
            # tiers): printed once, on the run's first row, so no level looks as if it moved them.
            lines.append(f"{name:<{wn}} {s.get('algorithm', '?'):<{wa}} {str(s.get('model', '?')):<{wm}} "
                         f"{rnd:>4} {m['acc'] * 100:7.2f} {best * 100:7.2f} "
                         f"{m.get('f1_weighted', float('nan')) * 100:7.2f}{run_cols if i == 0 else ''}")
            shared_row = shared_row or i > 0
        for name, m in zip(names[len(evals):], (last.get("local") or {}).values(), strict=True):
            # A local entry with no samples (every client's local test split empty) is {"n": 0}, no acc.
            acc = f"{m['acc'] * 100:7.2f}" if "acc" in m else f"{'-':>7}  (no local test samples)"
            lines.append(f"{name:<{wn}} {'':<{wa}} {'':<{wm}} {last['round']:>4} {acc}")
    if shared_row:
        lines.append("(up, up x, down and sim s are the whole run's, on its first row)")
    deployed = [(p, s["deployment"]) for p, s, _ in loaded if isinstance(s.get("deployment"), dict)]
    if deployed:
        # Every method's 'down' counts the training rounds only; a model handed out once after training
        # (HybridCompFL's compressed rungs) is a separate cost, shown beside it rather than added in.
        lines.append("")
        for p, d in deployed:
            lines.append(f"{label_of[p]}: plus {fmt_bytes(d.get('bytes_down', 0))} deployed once after training to "
                         f"the constrained devices ({d.get('served', 0)} devices served, {d.get('unserved', 0)} "
                         f"unserved); not in 'down', which counts training rounds as for every method")
    groups, repeats = seed_groups([(label_of[p], p, s, rows) for p, s, rows in loaded])
    if groups:
        lines += ["", *seed_table(groups, repeats), *paired_differences(groups)]
    if target is not None:
        lines += ["", *target_table([(label_of[p], rows) for p, _, rows in loaded], target, groups)]
    unfinished = [(p, s, rows) for p, s, rows in loaded if s.get("unfinished")]
    if unfinished:
        lines.append("")
        for p, s, rows in unfinished:
            of = f" of {s['rounds']}" if "rounds" in s else ""
            lines.append(f"* {label_of[p]}: unfinished, stopped after round {rows[-1]['round']}{of} "
                         f"(fedslim run --resume continues it from its last checkpoint)")
    out = Path(out_dir) if out_dir else paths[0].parent / "report"
    written = _plots([(label_of[p], s, rows) for p, s, rows in loaded], out)
    if groups:
        written.append(_seed_plot(groups, out))
    if csv_path is not None:
        written.append(write_csv(Path(csv_path), [(label_of[p], p, s, rows) for p, s, rows in loaded]))
    lines.append("")
    lines += [f"wrote {w}" for w in written]
    return "\n".join(lines)


def write_csv(path: Path, runs: list[tuple[str, Path, dict[str, Any], list[dict[str, Any]]]]) -> Path:
    """One row per run and evaluated model (global, level, tier, local/<tier>) at the run's last
    evaluated round: every metric it recorded, the best accuracy over its rounds, and the run's seed,
    traffic and simulated time so far. For a spreadsheet or a data frame."""
    import csv
    import io

    fixed = ["run", "folder", "algorithm", "model", "dataset", "seed", "evaluated", "round", "finished"]
    records: list[dict[str, Any]] = []
    metrics: list[str] = []
    for label, folder, summary, rows in runs:
        last = rows[-1]
        got = seed_and_rest(folder)
        base = {"run": label, "folder": str(folder), "algorithm": summary.get("algorithm"),
                "model": summary.get("model"), "dataset": summary.get("dataset"),
                "seed": got[0] if got else None, "round": last["round"], "finished": not summary.get("unfinished")}
        run_cols = {"bytes_up": last["cum_bytes_up"], "bytes_down": last["cum_bytes_down"],
                    "sim_time_s": last.get("sim_time_s")}
        evaluated = [(k, m, max(r["eval"][k]["acc"] for r in rows if k in r.get("eval", {})))
                     for k, m in last.get("eval", {}).items()]
        evaluated += [(f"local/{k}", m, None) for k, m in (last.get("local") or {}).items()]
        for name, m, best in evaluated:
            for k in m:
                if k not in metrics:
                    metrics.append(k)
            records.append({**base, "evaluated": name, **m, "best_acc": best, **run_cols})
    columns = [*fixed, *metrics, "best_acc", "bytes_up", "bytes_down", "sim_time_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    for rec in records:
        w.writerow({k: "" if v is None else v for k, v in rec.items()})
    try:
        atomic_write_text(path, buf.getvalue())
    except OSError as e:
        raise ReportError(f"--csv: cannot write {path} ({e.strerror or e})") from None
    return path


def target_table(runs: list[tuple[str, list[dict[str, Any]]]], target: float,
                 groups: list[SeedGroup] | None = None) -> list[str]:
    """Lines of a table of what each run (label, rows) and evaluated model spent until its test accuracy
    first reached ``target`` percent, at an evaluated round: that round, the bytes up and down so far and
    the simulated time. A seed group gets the means where every seed reached it."""
    table: list[tuple[str, ...]] = []

    def reach(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
        return next((r for r in rows if label in r.get("eval", {}) and r["eval"][label]["acc"] * 100 >= target),
                    None)

    for run, rows in runs:
        for label in rows[-1].get("eval", {}):
            name = run if label == "global" else f"{run}[{label}]"
            hit = reach(rows, label)
            if hit is None:
                best = max(r["eval"][label]["acc"] for r in rows if label in r.get("eval", {}))
                table.append((name, "-", "", "", "", "", f"not reached (best {best * 100:.2f} by round "
                                                          f"{rows[-1]['round']})"))
            else:
                table.append((name, str(hit["round"]), fmt_bytes(hit["cum_bytes_up"]),
                              fmt_bytes(hit["cum_bytes_down"]),
                              fmt_bytes(hit["cum_bytes_up"] + hit["cum_bytes_down"]),
                              f"{hit.get('sim_time_s', 0.0):.1f}", ""))
    for g in groups or []:
        for label in g.labels:
            name = (g.name if label == "global" else f"{g.name}[{label}]") + f" (mean of {len(g.runs)})"
            hits = [reach(rows, label) for _, _, rows, _ in g.runs]
            got = [h for h in hits if h is not None]
            if len(got) < len(hits):
                table.append((name, "-", "", "", "", "", f"reached by {len(got)} of {len(hits)} seeds"))
                continue
            table.append((name, f"{statistics.fmean(h['round'] for h in got):.1f}",
                          fmt_bytes(statistics.fmean(h["cum_bytes_up"] for h in got)),
                          fmt_bytes(statistics.fmean(h["cum_bytes_down"] for h in got)),
                          fmt_bytes(statistics.fmean(h["cum_bytes_up"] + h["cum_bytes_down"] for h in got)),
                          f"{statistics.fmean(h.get('sim_time_s', 0.0) for h in got):.1f}", ""))
    return [f"To {target:g} % test accuracy: the first evaluated round at or above it, and the bytes and "
            f"simulated time spent until then",
            *columns(("run", "round", "up", "down", "up+down", "sim s", ""), table, "lrrrrrl")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write the figure to ``path`` whole or not at all (a report run again replaces its plots)."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _seed_plot(groups: list[SeedGroup], out: Path) -> Path:
    """Accuracy against rounds per seed group: the mean over the seeds, shaded one sample standard
    deviation either side, over the rounds every seed evaluated."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for g in groups:
        for label in g.labels:
            per_run = [{r["round"]: r["eval"][label]["acc"] * 100 for r in rows if label in r.get("eval", {})}
                       for _, _, rows, _ in g.runs]
            rounds = sorted(set.intersection(*(set(d) for d in per_run)))
            mean = [statistics.fmean(d[t] for d in per_run) for t in rounds]
            sd = [statistics.stdev(d[t] for d in per_run) for t in rounds]
            name = g.name if label == "global" else f"{g.name}[{label}]"
            (line,) = ax.plot(rounds, mean, marker="o", ms=3, label=f"{name} (n={len(g.runs)})")
            ax.fill_between(rounds, [m - d for m, d in zip(mean, sd, strict=True)],
                            [m + d for m, d in zip(mean, sd, strict=True)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "accuracy_over_seeds.png")


def _plots(loaded: list[tuple[str, dict[str, Any], list[dict[str, Any]]]], out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    # Bytes get two panels: with an uncompressed downlink the total hides what an uplink codec saved.
    xs_of = {"round": ("round", lambda r: r["round"]),
             "total": ("cumulative bytes (up + down, MB)", lambda r: (r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6),
             "up": ("cumulative uplink bytes (MB)", lambda r: r["cum_bytes_up"] / 1e6),
             "time": ("simulated wall-clock time (s)", lambda r: r.get("sim_time_s", 0.0))}
    for panels, fname in ((("round",), "accuracy_vs_round.png"), (("total", "up"), "accuracy_vs_bytes.png"),
                          (("time",), "accuracy_vs_sim_time.png")):
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            xlabel, x_of = xs_of[panel]
            for run_label, _, rows in loaded:
                labels = list(rows[-1].get("eval", {}))
                for label in labels:
                    pts = [r for r in rows if label in r.get("eval", {})]
                    name = run_label if len(labels) == 1 else f"{run_label}[{label}]"
                    ax.plot([x_of(r) for r in pts], [r["eval"][label]["acc"] * 100 for r in pts], marker="o",
                            ms=3, label=name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            if panel in ("total", "up"):
                ax.set_xscale("log")
                _plain_log_ticks(ax)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out / fname))
    return written


def _plain_log_ticks(ax: Any) -> None:
    """Log axis labelled 1, 2, 5, 10, 20 ... in plain numbers: the default labels every minor tick as
    m x 10^e, and those overlap when the axis spans less than a decade or two."""
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: int) -> str:
        mantissa = f"{v:.0e}"[0]
        return f"{v:g}" if mantissa in "125" else ""

    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    ax.xaxis.set_minor_formatter(FuncFormatter(fmt))


def seeds_summary(runs: list[Path]) -> list[str]:
    """The table over seeds of these run folders, labelled as ``fedslim report`` labels them."""
    labels = run_labels(runs)
    groups, repeats = seed_groups([(label, p, *load_run(p)) for label, p in zip(labels, runs, strict=True)])
    return seed_table(groups, repeats)
