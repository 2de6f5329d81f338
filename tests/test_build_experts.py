"""scripts/build_experts.py: the expert training rows are built from held-out-safe data."""

import importlib.util
import json
from pathlib import Path

import pytest

from distill.evaluation.scorers import number_match

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_experts", ROOT / "scripts" / "build_experts.py")
be = importlib.util.module_from_spec(spec)
spec.loader.exec_module(be)


@pytest.mark.parametrize("equation,ans,want", [
    ("X=((22.0-14.0)/4.0)", 2.0, " (22 - 14) / 4 = 2"),
    ("X=(8.0*2.0)", 16.0, " 8 * 2 = 16"),
    ("X=(1.5+2.25)", "3.75", " 1.5 + 2.25 = 3.75"),
    ("x=(3.0/4.0)", 0.75, " 3 / 4 = 0.75"),
    ("X=(8.0*2.0)", 17.0, None),          # the equation does not give the answer
    ("X=(8.0*2.0)+__import__", 16.0, None),  # anything but digits and + - * / ( ) is refused
    ("X=(1.0/0.0)", 1.0, None),
    ("4.0+X=10.0", 6.0, None),             # not of the form X=...
])
def test_math_target(equation, ans, want):
    assert be.math_target(equation, ans) == want


def test_math_targets_are_read_back_by_the_competition_number_rule():
    rows = json.loads((ROOT / "eval/data/mawps/trainset.json").read_text())
    made = [(be.math_target(r["equation"], r["ans"]), r["ans"]) for r in rows]
    made = [(t, a) for t, a in made if t is not None]
    assert len(made) > 1750
    assert all(number_match(t, str(a))[1] for t, a in made)


def test_math_rows_leave_out_every_validation_question():
    seen = [p for p, _ in be.math_pairs()]
    held = {r["original_text"].strip().lower()
            for r in json.loads((ROOT / "eval/data/mawps/validset.json").read_text())}
    assert seen and not any(p.strip().lower() in held for p in seen)


def test_boolq_rows_use_only_rows_from_index_1000():
    from distill.evaluation.examples import build_examples
    from distill.evaluation.spec import load_task

    prompts = [e.prompt for e in build_examples(load_task(str(ROOT / "eval/tasks/boolq.yaml")))]
    seen = be.boolq_pairs()
    assert [p for p, _ in seen] == prompts[be.BOOLQ_TRAIN_FROM:]
    # every answer in the standard protocol's layout: a space, then the choice
    assert all(a.startswith(" ") and a[1:] == a.strip() for _, a in seen)


def test_repeating_decimals_are_left_out():
    assert be.math_target("X=(31.0/3.0)", 10.333333333333334) is None


def test_committed_calibration_pools_are_what_the_script_writes():
    spec = importlib.util.spec_from_file_location("make_calibration", ROOT / "scripts" / "make_calibration.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    for name in ("math", "boolq"):
        committed = (ROOT / "recipes" / "data" / f"{name}_calibration.jsonl").read_text(encoding="utf-8")
        assert committed == mc.lines(name), f"recipes/data/{name}_calibration.jsonl is stale: rerun the script"
    rows = [json.loads(x) for x in (ROOT / "recipes/data/boolq_calibration.jsonl").read_text().splitlines()]
    assert len(rows) == 3270 - be.BOOLQ_TRAIN_FROM
