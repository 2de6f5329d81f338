"""The synthetic consolidation experiment, end to end through the real CLI (issue 2's acceptance),
from the cache and with online teachers (issue 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "synthetic.yaml"


def _run(run_dir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    # One BLAS thread: tiny matrices gain nothing from more, and it keeps the run steady on a busy box.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "distill", "run", str(RECIPE), f"run_dir={run_dir}", *overrides],
                          capture_output=True, text=True, cwd=run_dir.parent, env=env)
    return proc, time.time() - start


def _check_retention(run: Path) -> str:
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
    return table


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    """`distill run recipes/synthetic.yaml` once: builds the models, caches, trains, evaluates."""
    run = tmp_path_factory.mktemp("synthetic") / "run"
    proc, elapsed = _run(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"synthetic experiment: {elapsed:.0f}s")
    return run


@pytest.mark.slow
def test_synthetic_experiment_consolidates_both_experts(cached_run):
    table = _check_retention(cached_run)
    assert (cached_run / "eval" / "scores.json").exists() and (cached_run / "recipe.resolved.yaml").exists()
    print(table)


@pytest.mark.slow
def test_online_distillation_consolidates_both_experts(cached_run):
    """The same recipe with `train.online_teachers=true`, on the same synthetic models (copied, so the
    build is reused): the cache holds tokens only, the experts run on every micro-batch, and the
    student reaches the same retention bar."""
    run = cached_run.parent / "online"
    shutil.copytree(cached_run / "synthetic", run / "synthetic")
    proc, elapsed = _run(run, "train.online_teachers=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "online teachers: expert_add, expert_rev" in proc.stdout, proc.stdout[-2000:]
    assert not list((run / "cache").glob("*/teacher-*.npy")) and list((run / "cache").glob("*/input_ids.npy"))
    print(f"synthetic experiment, online teachers: {elapsed:.0f}s\n{_check_retention(run)}")
