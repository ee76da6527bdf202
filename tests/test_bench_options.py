"""bench/bench_options.py: the benchmark scripts refuse out-of-range options before running anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_options import check_options  # noqa: E402


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--model", default="lenet5")
    return ap, ap.parse_args(argv)


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "0"], "--steps: must be at least 1 (got 0)"),
    (["--threads", "-2"], "--threads: must be at least 1 (got -2)"),
    (["--width", "0"], "--width: must be a positive number (got 0.0)"),
    (["--dropout", "1"], "--dropout: must be in [0, 1) (got 1.0)"),
    (["--model", "lenet"], "--model: unknown model 'lenet'; allowed: "),
])
def test_an_option_out_of_range_is_an_argparse_error(argv: list[str], expected: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ap, args = _parse(argv)
    with pytest.raises(SystemExit) as e:
        check_options(ap, args, at_least_one=("steps", "threads"), positive=("width",), fraction=("dropout",),
                      model=True)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_options_in_range_and_unset_ones_pass() -> None:
    ap, args = _parse(["--steps", "1", "--width", "0.25", "--dropout", "0.5", "--model", "vgg16"])
    check_options(ap, args, at_least_one=("steps", "threads"), positive=("width",), fraction=("dropout",), model=True)
