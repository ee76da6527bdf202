"""bench/step_cost.py on a model with no narrow channels: the padded variants are left out, not fatal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_cost.py"


def test_a_model_without_narrow_channels_runs_without_the_padded_variants() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--width", "2", "--trials", "1", "--steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-500:]
    rows = [ln.split("  ")[0] for ln in out.stdout.splitlines() if ln.endswith("x") and "ms/step" not in ln]
    assert "all + pool first" in rows and "plain" in rows and "all + pool first + flat" in rows
    assert not any("padded" in r for r in rows)
    assert "lenet5 at width 2 has no channels below 8: no padded variants" in out.stdout
