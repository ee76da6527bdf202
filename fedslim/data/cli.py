"""``fedslim data ...``: list, download, inspect and verify datasets.

:func:`add_data_commands` plugs into the main parser; every command returns an exit code and reports
errors as one line on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedslim.data import datasets, download
from fedslim.data.formats import DataError
from fedslim.registry import DATASETS, UnknownNameError

Handler = Callable[[argparse.Namespace], int]


def reader_gone() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null, so the interpreter's final flush
    does not fail again, and return the shell's exit status for a pipe closed under a writer (141)."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _guard(fn: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BrokenPipeError:
            # The reader went away (`fedslim data info mnist | head`): stop quietly as other tools do.
            return reader_gone()
        except (DataError, ValueError, UnknownNameError, OSError) as e:
            print(f"fedslim: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("fedslim: interrupted", file=sys.stderr)
            return 130

    return run


def _parse_options(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    downloadable = set(download.downloadable())
    width = max(len(n) for n in DATASETS.names())
    for name in DATASETS.names():
        opts = ", ".join(f"{k}={v!r}" for k, v in datasets.dataset_options(name).items()) or "-"
        dl = "  [download]" if name in downloadable else ""
        print(f"{name:<{width}}  {DATASETS.doc(name)}{dl}\n{'':<{width}}  options: {opts}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    files = download.download(args.name, Path(args.to), base_url=args.base_url, log=log)
    for f in files:
        print(f)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    t0 = time.perf_counter()
    b = datasets.load_dataset(args.name, args.data_dir, options=_parse_options(args.option))
    dt = time.perf_counter() - t0
    train_counts = np.bincount(b.train.y.numpy(), minlength=b.num_classes)
    test_counts = np.bincount(b.test.y.numpy(), minlength=b.num_classes)
    print(f"dataset   {b.name}: {DATASETS.doc(args.name)}")
    print(f"train     {len(b.train)} samples")
    print(f"test      {len(b.test)} samples")
    print(f"shape     {tuple(b.input_shape)} {str(b.train.x.dtype).removeprefix('torch.')}, "
          f"mean {b.train.x.mean().item():.3f}, std {b.train.x.std().item():.3f}")
    print(f"classes   {b.num_classes}")
    w = max(len(c) for c in b.class_names)
    for i, c in enumerate(b.class_names):
        print(f"  {i:>3} {c:<{w}}  train {int(train_counts[i]):>6}  test {int(test_counts[i]):>6}")
    print(f"loaded in {dt:.2f}s")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    name = download.ALIASES.get(args.name, args.name)
    if name not in download.downloadable():
        DATASETS.get(name, field="dataset")  # an unknown name is an error, a known one has no files
        print(f"{name}: no files to verify (built in or user-provided)")
        return 0
    results = download.verify(name, datasets.resolve_root(args.data_dir))
    bad = 0
    for path, ok, msg in results:
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {path}: {msg}")
    if bad:
        print(f"fedslim: {bad} of {len(results)} files failed verification", file=sys.stderr)
        return 1
    return 0


def add_data_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data {list,download,info,verify}`` to the main parser's subparsers."""
    p = subparsers.add_parser("data", help="datasets: list, download, info, verify",
                              description="Work with datasets: download and verify files, inspect them.")
    sub = p.add_subparsers(dest="data_command", metavar="{list,download,info,verify}")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)

    s = sub.add_parser("list", help="registered datasets and their options")
    s.set_defaults(func=_guard(_cmd_list))

    s = sub.add_parser("download", help="download and verify a dataset's standard files",
                       description=f"Downloadable: {', '.join(download.downloadable())}.")
    s.add_argument("name", help="mnist, fmnist, cifar10 or cifar10-jpeg")
    s.add_argument("--to", required=True, metavar="DIR", help="data folder to download into")
    s.add_argument("--base-url", metavar="URL", help="fetch <URL>/<file> instead of the public mirrors")
    s.set_defaults(func=_guard(_cmd_download))

    s = sub.add_parser("info", help="load a dataset and print sizes, shape and classes")
    s.add_argument("name")
    s.add_argument("--data-dir", metavar="DIR", help="data folder (default: $FEDSLIM_DATA, else ./data)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a data.options entry (repeatable)")
    s.set_defaults(func=_guard(_cmd_info))

    s = sub.add_parser("verify", help="check a dataset's files against the known checksums")
    s.add_argument("name")
    s.add_argument("--data-dir", metavar="DIR",
                   help="data folder holding the dataset (default: $FEDSLIM_DATA, else ./data, as the loader)")
    s.set_defaults(func=_guard(_cmd_verify))
    return p
