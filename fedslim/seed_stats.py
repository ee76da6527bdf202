"""Runs that differ only in their seed: grouping them, their spread, and differences paired by seed."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedslim.config import comparable_config
from fedslim.results import CONFIG_FILE
from fedslim.tables import columns, fmt_bytes


def seed_and_rest(run: Path) -> tuple[int, dict[str, Any]] | None:
    """A run's seed, and the rest of its config as far as it decides the numbers (None when unreadable)."""
    try:
        cfg = yaml.safe_load((run / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("seed", 0), int):
        return None
    d = comparable_config(cfg)
    return d.pop("seed", 0), d


def _mean_sd(xs: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return f"{statistics.fmean(xs) * scale:{fmt}} ± {statistics.stdev(xs) * scale:{fmt}}"


@dataclass
class SeedGroup:
    """Finished runs whose configs differ in their seed alone, by seed: (label, summary, rows, seed)."""

    name: str
    runs: list[tuple[str, dict[str, Any], list[dict[str, Any]], int]]
    config: dict[str, Any]  # what decides the numbers, less the seed

    @property
    def labels(self) -> list[str]:
        """The evaluated models every run of the group reports in its last round (global, levels, tiers)."""
        first = self.runs[0][2][-1].get("eval", {})
        return [k for k in first if all(k in rows[-1].get("eval", {}) for _, _, rows, _ in self.runs)]


def seed_groups(runs: list[tuple[str, Path, dict[str, Any], list[dict[str, Any]]]]) -> tuple[list[SeedGroup],
                                                                                              list[str]]:
    """The groups of two or more finished runs among ``runs`` (label, folder, summary, rows) whose configs
    differ in their seed alone, and a line for each run left out as the repeat of another's seed."""
    by_config: dict[str, list[tuple[str, dict[str, Any], list[dict[str, Any]], int]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for label, path, summary, rows in runs:
        got = None if summary.get("unfinished") else seed_and_rest(path)
        if got is not None:
            key = json.dumps(got[1], sort_keys=True, default=str)
            configs[key] = got[1]
            by_config.setdefault(key, []).append((label, summary, rows, got[0]))
    groups, repeats = [], []
    for key, members in by_config.items():
        # The same config and seed give the same numbers (a copy, or a run repeated): counted once.
        kept: dict[int, tuple[str, dict[str, Any], list[dict[str, Any]], int]] = {}
        for m in members:
            if m[3] in kept:
                repeats.append(f"{m[0]} repeats {kept[m[3]][0]} (seed {m[3]}, same config): counted once")
            else:
                kept[m[3]] = m
        if len(kept) > 1:
            g = sorted(kept.values(), key=lambda m: m[3])
            bases = {re.sub(r"-seed\d+$", "", label) for label, *_ in g}
            name = f"{bases.pop()}-seed*" if len(bases) == 1 else ", ".join(label for label, *_ in g)
            groups.append(SeedGroup(name, g, configs[key]))
    return groups, repeats


def seed_table(groups: list[SeedGroup], repeats: list[str]) -> list[str]:
    """Lines of a table over seeds: per group and evaluated model, the final and best accuracy and the
    weighted F1 as mean ± sample standard deviation; the mean traffic and simulated time. Empty without
    a group."""
    if not groups:
        return []
    table: list[tuple[str, ...]] = []
    for g in groups:
        for i, label in enumerate(g.labels):
            finals = [rows[-1]["eval"][label] for _, _, rows, _ in g.runs]
            best = [max(r["eval"][label]["acc"] for r in rows if label in r.get("eval", {}))
                    for _, _, rows, _ in g.runs]
            f1 = [m.get("f1_weighted", float("nan")) for m in finals]
            run_cols: tuple[str, ...] = ("", "", "", "", "", "")
            if i == 0:
                lasts = [rows[-1] for _, _, rows, _ in g.runs]
                run_cols = (str(g.runs[0][1].get("algorithm", "?")), str(len(g.runs)),
                            ",".join(str(seed) for *_, seed in g.runs),
                            fmt_bytes(statistics.fmean(r["cum_bytes_up"] for r in lasts)),
                            fmt_bytes(statistics.fmean(r["cum_bytes_down"] for r in lasts)),
                            f"{statistics.fmean(r.get('sim_time_s', 0.0) for r in lasts):.1f}")
            table.append((g.name if label == "global" else f"{g.name}[{label}]", *run_cols[:3],
                          _mean_sd([m["acc"] for m in finals], 100), _mean_sd(best, 100), _mean_sd(f1, 100),
                          *run_cols[3:]))
    # Name, algo, n and seeds are text; the figures are right-aligned.
    return ["Runs whose configs differ only in their seed: final round, mean ± sample std over the seeds "
            "(up, down, sim s: means)",
            *columns(("seeds of", "algo", "n", "seeds", "acc", "best", "f1_w", "up", "down", "sim s"), table,
                      "llllrrrrrr"),
            *repeats]


# What a seed draws from: where these agree, one seed is one split, device population, initial model
# and cohort sequence, whatever the algorithm, codec and local training.
PAIRED_SECTIONS = ("data", "model", "devices", "federation")


def paired_differences(groups: list[SeedGroup]) -> list[str]:
    """Lines comparing every seed group with the first one, seed by seed: one seed is one data split and
    device population (and one start and cohort sequence where the methods build and sample alike), so
    the per-seed difference in final accuracy leaves that draw out.

    A model compares with the first group's model of the same name (``global``, a level, a tier), or,
    when the first group has one model only, every model does (HeteroFL's levels against FedAvg)."""
    if len(groups) < 2:
        return []
    ref = groups[0]
    ref_acc = {seed: rows[-1]["eval"] for _, _, rows, seed in ref.runs}
    lines = []
    for g in groups[1:]:
        common = [seed for *_, seed in g.runs if seed in ref_acc]
        differ = [k for k in PAIRED_SECTIONS if g.config.get(k) != ref.config.get(k)]
        if differ:
            lines.append(f"{g.name} - {ref.name}: not paired, they differ in {', '.join(differ)} (a seed draws the "
                         f"same split, devices and weights only where those agree)")
            continue
        if len(common) < 2:
            lines.append(f"{g.name} - {ref.name}: fewer than two seeds in common, not compared")
            continue
        mine = {seed: rows[-1]["eval"] for _, _, rows, seed in g.runs}
        for label in g.labels:
            other = label if label in ref.labels else (ref.labels[0] if len(ref.labels) == 1 else None)
            if other is None:
                continue
            diffs = [(mine[s][label]["acc"] - ref_acc[s][other]["acc"]) * 100 for s in common]
            mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            low, high = _t_interval(mean, sd, len(diffs))
            a = g.name if label == "global" else f"{g.name}[{label}]"
            b = ref.name if other == "global" else f"{ref.name}[{other}]"
            lines.append(f"{a} - {b}: {mean:+.2f} ± {sd:.2f} points of final accuracy over seeds "
                         f"{','.join(map(str, common))}, 95 % CI {low:+.2f} to {high:+.2f} (per seed: "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)})")
    return ["", "Paired by seed (one seed, one data split and device population; and one start and cohort "
                "sequence where the methods build and sample alike), mean ± sample std, and the 95 % confidence "
                "interval of the mean (Student's t):", *lines] if lines else []


def _t_interval(mean: float, sd: float, n: int) -> tuple[float, float]:
    """The two-sided 95 % confidence interval of a mean of ``n`` paired differences (Student's t: few
    seeds, so not the normal's 1.96)."""
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * sd / n ** 0.5
    return mean - half, mean + half
