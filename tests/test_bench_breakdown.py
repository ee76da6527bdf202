"""bench/step_breakdown.py: reading oneDNN's verbose log, and a real child's log read back."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
breakdown = pytest.importorskip("step_breakdown")

CONV = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,"
        "src:f32::blocked:acdb::f0 wei:f32:a:blocked:Acdb8a::f0,attr-scratchpad:user,alg:convolution_direct,"
        "mb64_ic1oc8_ih28oh28kh5sh1dh0ph2_iw28ow28kw5sw1dw0pw2,{ms}")
REORDER = ("onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,src:f32::blocked:acdb::f0 "
           "dst:f32::blocked:Acdb8a::f0,attr-scratchpad:user,,8x1x5x5,{ms}")


def test_per_step_times_count_only_executions_between_the_markers() -> None:
    lines = [CONV.format(ms=9.0),  # warm-up: before the markers
             breakdown.BEGIN,
             CONV.format(ms=0.5), REORDER.format(ms=0.25), CONV.format(ms=0.7),
             "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,x,forward_training,,,,mb64,3.0",
             "onednn_verbose,v1,info,oneDNN v3",
             breakdown.END,
             CONV.format(ms=9.0)]
    got = breakdown.parse_verbose(lines, steps=2)
    conv_key = "convolution forward_training mb64_ic1oc8_ih28oh28kh5sh1dh0ph2_iw28ow28kw5sw1dw0pw2"
    assert got == {conv_key: pytest.approx(0.6), "reorder 8x1x5x5": pytest.approx(0.125)}
    assert breakdown.group(conv_key) == "convolution forward_training"
    assert breakdown.group("reorder 8x1x5x5") == "reorder (layout changes)"


def test_missing_markers_and_bad_step_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="markers"):
        breakdown.parse_verbose([CONV.format(ms=1.0)], steps=1)
    with pytest.raises(ValueError, match="steps"):
        breakdown.parse_verbose([breakdown.BEGIN, breakdown.END], steps=0)
    for flag in ("--batch", "--trials"):
        out = subprocess.run([sys.executable, str(BENCH / "step_breakdown.py"), flag, "0"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and f"{flag}: must be at least 1" in out.stderr


def test_a_real_tuned_step_logs_every_convolution_pass() -> None:
    """This torch's oneDNN still logs in the format parse_verbose reads: one LeNet-5 step runs both
    convolutions forward, both weight gradients and the second one's data gradient."""
    args = argparse.Namespace(model="lenet5", width=1.0, batch=64, steps=2, trials=1)
    got = breakdown.parse_verbose(breakdown.run_child(args, "tuned", verbose=True), steps=2)
    per_pass: dict[str, int] = {}
    for key, ms in got.items():
        assert ms > 0
        per_pass[breakdown.group(key)] = per_pass.get(breakdown.group(key), 0) + 1
    assert per_pass["convolution forward_training"] == 2
    assert per_pass["convolution backward_weights"] == 2
    assert per_pass["convolution backward_data"] == 1  # the first convolution's input needs no gradient
