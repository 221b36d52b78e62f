"""Smoke test of benchmarks/battery.py: the --quick run finishes and prints its ratio line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_battery_quick_prints_ratio() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "battery.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"^RATIO baseline / routeaudit run = ([0-9.]+)x \(target >= 50x\) (MET|MISSED)$",
                  proc.stdout, re.MULTILINE)
    assert m is not None, proc.stdout[-2000:]
    ratio = float(m.group(1))
    assert ratio > 0
    assert (m.group(2) == "MET") == (ratio >= 50)
    # the baseline did the permutation work it claims: 15 bins x 4 summaries, one call each
    assert "60 scipy.stats.permutation_test calls" in proc.stdout
    assert "routeaudit run: 27 verdicts" in proc.stdout
