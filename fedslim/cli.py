"""The ``fedslim`` command line: run, list, report, data."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

from fedslim.config import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from fedslim.config import load_config
    from fedslim.engine.run import Runner

    overrides = list(args.set or [])
    # `is not None`: `--rounds 0` or `--name ''` must reach validation, not be dropped for being falsy.
    if args.name is not None:
        overrides.append(f"name={args.name}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    progress = False if args.quiet else None
    if args.seeds:
        from fedslim.seeds import run_seeds

        run_seeds(args.config, overrides, args.seeds, data_dir=args.data_dir, resume=args.resume, progress=progress)
        return 0
    cfg = load_config(args.config, overrides)
    Runner(cfg, data_dir=args.data_dir, resume=args.resume, progress=progress).run()
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedslim import plugins

    for spec in args.plugin:
        plugins.load_plugin(str(Path(spec).resolve()) if plugins.is_file_spec(spec) else spec, field="--plugin")

    groups = {"datasets": plugins.DATASETS, "partitioners": plugins.PARTITIONERS, "models": plugins.MODELS,
              "algorithms": plugins.ALGORITHMS, "codecs": plugins.CODECS, "backends": plugins.BACKENDS}
    for title, reg in groups.items():
        if args.what and args.what != title:
            continue
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:<16} {reg.doc(name)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedslim.report import report

    print(report(args.runs, out_dir=args.out, target=args.target, csv_path=args.csv))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from fedslim.config import dump_config, load_config, params_defaults_comment

    cfg = load_config(args.config, args.set)
    print(dump_config(cfg) + params_defaults_comment(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedslim", description="Model-heterogeneous federated learning with "
                                "model compression: simulate, compress, compare.")
    p.add_argument("--version", action="version", version=f"fedslim {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a federation from a YAML config (default: the embedded demo)")
    r.add_argument("config", nargs="?", help="YAML config file (omit for all defaults: digits + FedAvg)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. "
                   "--set federation.rounds=5 (repeatable)")
    r.add_argument("--data-dir", help="folder holding datasets (else data.root, $FEDSLIM_DATA, ./data)")
    r.add_argument("--output-dir", help="parent folder of run folders (default: runs)")
    r.add_argument("--name", help="run folder name")
    r.add_argument("--rounds", type=int, help="shorthand for --set federation.rounds=N")
    r.add_argument("--resume", action="store_true",
                   help="continue the stopped run in the run folder; with --rounds N, continue it (stopped or "
                        "finished) to a new last round N")
    r.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run once per seed, into NAME-seed<SEED> each, then print accuracy as mean and spread "
                        "over the seeds (with --resume, stopped seeds continue and the rest start)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("config", help="print the resolved config, its fields validated (whether the model "
                       "and its options suit the dataset, and whether device tiers' model_bytes and memory_mb "
                       "hold their model, is checked when a run starts), and as comments the "
                       "algorithm.params it leaves unset, with their defaults")
    c.add_argument("config", nargs="?")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=_cmd_config)

    lst = sub.add_parser("list", help="list datasets, partitioners, models, algorithms, codecs, backends")
    lst.add_argument("what", nargs="?", choices=["datasets", "partitioners", "models", "algorithms", "codecs",
                                                 "backends"])
    lst.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                     help="import a plugin first (a module name, or a Python file relative to the current "
                          "folder), so that what it registers is listed too (repeatable)")
    lst.set_defaults(func=_cmd_list)

    rep = sub.add_parser("report", help="compare runs: a table and accuracy plots")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for plots (default: the first run's parent / report)")
    rep.add_argument("--target", type=float, metavar="ACC",
                     help="also tabulate the round, bytes and simulated time each run took to first reach ACC %% "
                          "test accuracy")
    rep.add_argument("--csv", metavar="FILE", help="also write one row per run and evaluated model (every metric "
                                                  "of its last evaluated round, seed, bytes, simulated time) to FILE")
    rep.set_defaults(func=_cmd_report)

    from fedslim.data.cli import add_data_commands

    add_data_commands(sub)
    return p


def _version() -> str:
    from fedslim import __version__

    return __version__


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None, *, _default: Any = warnings.showwarning) -> None:
    """fedslim's own warnings are said to a user, in one line; a source line of ours would mean
    nothing to them. Everyone else's keep Python's format."""
    if not os.path.abspath(filename).startswith(_PACKAGE_DIR):
        _default(message, category, filename, lineno, file, line)
        return
    print(f"fedslim: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from fedslim.engine.run import RunError
    from fedslim.registry import UnknownNameError
    from fedslim.report import ReportError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"fedslim: config error: {e}", file=sys.stderr)
        return 2
    except (RunError, UnknownNameError, ReportError) as e:
        print(f"fedslim: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        from fedslim.engine.ray_backend import MissingExtraError

        if not isinstance(e, MissingExtraError):
            raise
        print(f"fedslim: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        from fedslim.data.cli import reader_gone

        # `fedslim run ... | head`: the reader left, so the run stops at its next line, as a writer to a
        # closed pipe does; say so on stderr, which is still open, since a run has more to lose than a listing.
        if args.command == "run":
            print("fedslim: stdout was closed (broken pipe), so the run stopped printing and exited; what it "
                  "wrote is kept in its folder, and if it stopped before its last round, fedslim run --resume "
                  "continues it from its last checkpoint", file=sys.stderr)
        return reader_gone()
    except KeyboardInterrupt:
        print("fedslim: interrupted; a run continues from its last checkpoint with --resume (one stopped "
              "before its first checkpoint starts over when run again)", file=sys.stderr)
        return 130
    except Exception as e:
        from fedslim.data.formats import DataError

        if isinstance(e, DataError) or (isinstance(e, ValueError) and not os.environ.get("FEDSLIM_DEBUG")):
            print(f"fedslim: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
