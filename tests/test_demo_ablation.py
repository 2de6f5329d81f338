"""bench/demo_ablation.py: every variant is a valid override set of recipes/demo.yaml that changes the
training and nothing the comparison depends on (the evaluation, the cache's calibration data)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import demo_ablation  # noqa: E402

from distill.config import load_recipe, recipe_dict  # noqa: E402


@pytest.mark.parametrize("name", [n for n in demo_ablation.VARIANTS if demo_ablation.VARIANTS[n]])
def test_each_variant_loads_and_keeps_the_evaluation(name):
    shipped = recipe_dict(load_recipe(demo_ablation.RECIPE))
    variant = recipe_dict(load_recipe(demo_ablation.RECIPE, demo_ablation.VARIANTS[name]))
    assert variant != shipped, name  # it changes something ...
    assert variant["eval"] == shipped["eval"]  # ... but not what is scored, nor how
    if not demo_ablation._data_overrides(demo_ablation.VARIANTS[name]):
        assert variant["data"] == shipped["data"] and variant["cache"] == shipped["cache"]


def test_list_and_unknown_variant():
    script = str(ROOT / "bench" / "demo_ablation.py")
    listed = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and "seed1: seed=1" in listed.stdout and "demo: (as shipped)" in listed.stdout
    bad = subprocess.run([sys.executable, script, "--only", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown variant(s) nope" in bad.stderr
