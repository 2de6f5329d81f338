"""The synthetic consolidation experiment, end to end through the real CLI (issue 2's acceptance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_synthetic_experiment_consolidates_both_experts(tmp_path):
    start = time.time()
    # One BLAS thread: tiny matrices gain nothing from more, and it keeps the run steady on a busy box.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "distill", "run", str(ROOT / "recipes" / "synthetic.yaml"),
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, env=env)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    scores = report["scores"]
    assert set(scores) == {"base", "uniform_avg", "expert_add", "expert_rev", "student"}
    for expert, task in (("expert_add", "add"), ("expert_rev", "rev")):
        # The experiment means something: each expert is clearly better than the base on its skill ...
        assert scores[expert][task] >= scores["base"][task] + 0.3, scores
        # ... and the student keeps >= 90% of it.
        r = report["retention"][expert]
        assert r["task"] == task and r["retention"] >= 0.9, report["retention"]
    table = (run / "report.md").read_text()
    assert "| student |" in table and "retention" in table
    assert (run / "eval" / "scores.json").exists() and (run / "recipe.resolved.yaml").exists()
    print(f"synthetic experiment: {elapsed:.0f}s\n{table}")
