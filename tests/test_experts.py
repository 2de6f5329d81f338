"""The committed SmolLM2 experts score what experts/README.md says, run as it says."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_smollm_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.smollm
@needs_smollm_wheel
def test_committed_math_expert_reproduces_its_scores(tmp_path):
    # experts/README.md: base 0.017 [0.007, 0.043], math 0.278 [0.225, 0.339] on MAWPS validation (237).
    # MAWPS only: the BoolQ columns of experts/eval.yaml cost ~2 min a model on 2 cores.
    proc = subprocess.run([sys.executable, "-m", "distill", "eval", str(ROOT / "experts" / "eval.yaml"),
                           f"run_dir={tmp_path / 'run'}", "eval.cache=false", "eval.tasks=[mawps]",
                           "eval.skills={math: mawps}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n"]["math"]["mawps"] == report["n"]["base"]["mawps"] == 237
    assert 0.007 <= report["scores"]["base"]["mawps"] <= 0.043
    assert 0.225 <= report["scores"]["math"]["mawps"] <= 0.339
    assert report["experts_vs_base"]["math"]["low"] > 0  # clearly better than the base on its skill
