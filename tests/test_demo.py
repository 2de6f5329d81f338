"""The README's main command, scripts/demo.sh, on the real SmolLM2 model at a very small size
(a few calibration rows, one training step per student, four examples per task): the wiring of
cache -> two students -> merges -> evaluation -> report, through the same script users run."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import needs_smollm_wheel

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"base", "linear", "ties", "student_from_base", "math", "boolq", "student"}


@pytest.mark.slow
@pytest.mark.smollm
@needs_smollm_wheel
def test_demo_pipeline_at_a_very_small_size(tmp_path):
    run = tmp_path / "demo"
    small = [f"run_dir={run}", "data.sources.0.num_samples=4", "data.sources.1.num_samples=4", "eval.limit=4",
             f"eval.cache_dir={tmp_path / 'eval-cache'}"]
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh"), *small], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One cache, made once, serves both students.
    assert (run / "cache" / "manifest.json").exists() and not (run / "from_base" / "cache").exists()
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == ["math", "boolq"] and manifest["data"]["samples"] == 8
    # The from-base student did not start from a merge; the run's own student did.
    assert yaml.safe_load((run / "from_base" / "recipe.resolved.yaml").read_text())["student"]["init"] is None
    init = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["student"]["init"]
    assert init["method"] == "ties" and init["merge"] == ["math", "boolq"]
    for d in (run, run / "from_base"):
        assert json.loads((d / "train_result.json").read_text())["steps"] == 1
    # Every model on every task, BoolQ under both protocols, the report over the two skills.
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(scores) == MODELS
    for model in MODELS:
        assert set(scores[model]) == {"boolq", "boolq_standard", "mawps"}
        assert all(scores[model][t]["n"] == 4 for t in scores[model])
        assert scores[model]["boolq"]["protocol"] == "competition"
        assert scores[model]["boolq_standard"]["protocol"] == "standard"
    report = json.loads((run / "report.json").read_text())
    assert report["mean_tasks"] == ["boolq_standard", "mawps"] and report["best_merge"] in ("linear", "ties")
    assert set(report["vs_best_merge"]) == {"student_from_base", "student"}
    assert set(report["retention_by_student"]["student"]) == {"math", "boolq"}
    assert "## Students against the best merge" in proc.stdout and "demo: done in" in proc.stdout
    assert (run / "plots" / "scores.png").exists() and (run / "plots" / "train_loss.png").exists()
