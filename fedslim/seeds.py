"""``fedslim run --seeds``: one config run once per seed, each in its own folder, then the spread.

One seed is one draw of the split, the device population, the initial weights and every client's
sampling; a comparison of methods on one seed can be a comparison of draws. The runs are ordinary run
folders (``<name>-seed<k>``): each resumes, reports and plots on its own.
"""

from __future__ import annotations

from pathlib import Path

from fedslim.config import ConfigError, RunConfig, load_config
from fedslim.results import CHECKPOINT_FILE


def seed_configs(path: str | None, overrides: list[str], seeds: list[int]) -> list[RunConfig]:
    """The config of every seed's run: ``overrides`` plus its seed, in the folder ``<name>-seed<k>``."""
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("--seeds: --set seed=... sets the seed too; keep one of them")
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ConfigError(f"--seeds: {bad[0]} is not a seed; allowed: integers >= 0")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"--seeds: seed {twice[0]} is given twice; allowed: distinct integers >= 0")
    name = load_config(path, overrides).name
    return [load_config(path, [*overrides, f"seed={s}", f"name={name}-seed{s}"]) for s in seeds]


def run_seeds(path: str | None, overrides: list[str], seeds: list[int], *, data_dir: str | None = None,
              resume: bool = False, progress: bool | None = None) -> list[Path]:
    """Run the config once per seed, one after the other, and print the table over the seeds.

    Every seed's folder is checked before the first run starts, so a name already taken stops the
    sweep before it trains anything. With ``resume``, a seed whose folder holds a checkpoint continues
    from it (a finished one is left as it is) and the others start.
    """
    from fedslim.engine.run import Runner
    from fedslim.report import seeds_summary

    cfgs = seed_configs(path, overrides, seeds)
    runners = []
    for cfg in cfgs:
        r = Runner(cfg, data_dir=data_dir, progress=progress,
                   resume=resume and (Path(cfg.output_dir) / cfg.name / CHECKPOINT_FILE).exists())
        r.check_run_dir(quiet=True)
        runners.append(r)
    for i, r in enumerate(runners):
        print(f"== seed {r.cfg.seed} ({i + 1} of {len(runners)}): {r.run_dir}", flush=True)
        r.run()
    dirs = [r.run_dir for r in runners]
    lines = seeds_summary(dirs)
    if lines:
        print("\n" + "\n".join(lines))
        print(f"(fedslim report {' '.join(str(d) for d in dirs)} plots them)")
    return dirs
