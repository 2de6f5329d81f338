"""The run report: its intervals against hand-computed values, and the report of a small real run
(`distill run` on the tiny world: cache, train, eval of base, experts, a merge and the student)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_recipe, write_recipe
from distill import stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_wilson_hand_computed():
    # 8/10: p = 0.8, z^2/n = 0.38415; centre (0.8 + 0.19207) / 1.38415 = 0.71672;
    # half 1.95996 / 1.38415 * sqrt(0.016 + 0.0096) = 0.22656.
    low, high = stats.wilson(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94329, abs=1e-4)
    # 0/10: the lower end is 0 and the upper one z^2/n / (1 + z^2/n) = 0.27753 (Wald would give [0, 0]).
    low, high = stats.wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.27753, abs=1e-4)
    assert stats.wilson(10, 10) == pytest.approx((1 - 0.27753, 1.0), abs=1e-4)  # symmetric
    with pytest.raises(ValueError):
        stats.wilson(0, 0)
    # The interval holds the accuracy itself, to the last bit (0/100 gave low 1e-18 > 0 once,
    # and the scores plot refused the negative whisker).
    for n in (1, 7, 100, 237, 1000):
        for c in range(n + 1):
            low, high = stats.wilson(c, n)
            assert 0.0 <= low <= c / n <= high <= 1.0, (c, n)


def test_scores_plot_draws_zero_and_perfect_accuracies(tmp_path):
    from distill import plots

    cells = {m: {"t": (c / 100, *stats.wilson(c, 100))} for m, c in (("zero", 0), ("all", 100), ("some", 37))}
    out = plots.scores_plot(cells, tmp_path / "s.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_paired_difference_hand_computed():
    # d = [1, 0, 0, 1, -1]: mean 0.2; sample variance (0.64 + 0.04 + 0.04 + 0.64 + 1.44) / 4 = 0.7;
    # se = sqrt(0.7 / 5) = 0.374166; half-width 1.959964 * 0.374166 = 0.733351.
    d = stats.paired_difference([1, 1, 0, 1, 0], [0, 1, 0, 0, 1])
    assert d["n"] == 5 and d["diff"] == pytest.approx(0.2)
    assert d["se"] == pytest.approx(math.sqrt(0.14))
    assert (d["low"], d["high"]) == pytest.approx((0.2 - 0.733351, 0.2 + 0.733351), abs=1e-6)
    # The same models on the same examples: no difference and no spread.
    assert stats.paired_difference([1, 0, 1], [1, 0, 1]) == {"diff": 0.0, "low": 0.0, "high": 0.0, "se": 0.0, "n": 3}
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_difference([1, 0], [1])
    # Two tasks: mean of the differences, se = sqrt(se1^2 + se2^2) / 2.
    m = stats.mean_of_differences([d, {"diff": 0.4, "se": 0.1, "n": 10}])
    assert m["diff"] == pytest.approx(0.3) and m["se"] == pytest.approx(math.sqrt(0.14 + 0.01) / 2)
    assert m["n"] == 15


def test_gain_kept():
    assert stats.gain_kept(0.8, 0.9, 0.5) == pytest.approx(0.75)
    assert stats.gain_kept(0.8, 0.5, 0.5) is None  # the expert gained nothing over the base
    assert stats.gain_kept(None, 0.9, 0.5) is None


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):
    """`distill run` over the tiny world, evaluated on a 12-example multiple-choice task (random models
    score near chance there, so intervals and differences are not degenerate)."""
    root = tmp_path_factory.mktemp("report")
    rows = [{"text": f"{i}+{i}=", "label": "b" if i % 3 else "a"} for i in range(12)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text("kind: multiple_choice\ndataset: mc.jsonl\nchoices: ['a', 'b']\n"
                                  "label_map: {'a': 0, 'b': 1}\ntemplates: [{jinja: '{{ text }}'}]\n")
    # The standard protocol scores each choice after its prompt, so predictions vary by example and by
    # model (the competition one scores choices alone: one random model picks one choice everywhere);
    # one character each, so length does not decide.
    ev = {"tasks": [str(root / "mc.yaml")], "protocol": "standard", "skills": {"ta": "mc", "tb": "mc"},
          "models": [{"name": "base", "model": str(tiny_world["base"])}, {"name": "avg", "merge": ["ta", "tb"]}]}
    path = write_recipe(root / "r.yaml", tiny_recipe(tiny_world, root / "run", eval=ev))
    proc = subprocess.run([sys.executable, "-m", "distill", "run", str(path)], capture_output=True, text=True,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", proc.stdout


def _correct(path):
    return [float(json.loads(line)["correct"]) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_report_of_a_real_run(tiny_run):
    run, stdout = tiny_run
    report = json.loads((run / "report.json").read_text())
    assert set(report["scores"]) == {"base", "avg", "ta", "tb", "student"} and report["tasks"] == ["mc"]
    # Each accuracy's interval is Wilson's on the count of correct predictions in the predictions file.
    for model in report["scores"]:
        correct = _correct(run / "eval" / model / "mc.predictions.jsonl")
        assert report["n"][model]["mc"] == len(correct) == 12
        assert report["intervals"][model]["mc"] == pytest.approx(list(stats.wilson(int(sum(correct)), 12)))
    # One merge: it is the best; the student's paired difference is computed on the same examples.
    assert report["best_merge"] == "avg"
    diff = report["vs_best_merge"]["student"]["mc"]
    expected = stats.paired_difference(_correct(run / "eval" / "student" / "mc.predictions.jsonl"),
                                       _correct(run / "eval" / "avg" / "mc.predictions.jsonl"))
    assert diff == pytest.approx(expected) and report["vs_best_merge"]["student"]["mean"] == pytest.approx(
        {**expected, "n": 12})
    ret = report["retention"]["ta"]
    assert ret["base"] == report["scores"]["base"]["mc"] and ret["task"] == "mc"
    assert ret["gain_kept"] == stats.gain_kept(ret["student"], ret["teacher"], ret["base"])
    # Not a degenerate case: the student and the merge disagree on some examples.
    assert diff["high"] > diff["low"], diff
    # Each expert against the base on its own task, paired on the same examples.
    vs_base = report["experts_vs_base"]["ta"]
    ta_correct = _correct(run / "eval" / "ta" / "mc.predictions.jsonl")
    maj = vs_base.pop("vs_majority")
    assert vs_base == pytest.approx({"task": "mc", **stats.paired_difference(
        ta_correct, _correct(run / "eval" / "base" / "mc.predictions.jsonl"))})
    # ... and against always answering the majority class, "b" (8 of the 12 labels), paired the same way
    always_b = [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    assert maj == pytest.approx({"label": 1, "choice": "b", "rate": 8 / 12,
                                 **stats.paired_difference(ta_correct, always_b)})
    # Stage times, written by each stage.
    assert set(report["timings"]) == {"cache", "train", "eval"}
    assert all(v["wall_s"] > 0 for v in report["timings"].values())

    md = (run / "report.md").read_text()
    lo, hi = report["intervals"]["student"]["mc"]
    assert f"| **student** | {report['scores']['student']['mc']:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert "Wilson score interval" in md and "Examples per task (n): mc 12" in md
    assert f"| student | {diff['diff']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] (n=12)" in md
    assert "## Students against the best merge (avg" in md and "gain kept" in md
    assert (f"| ta | mc | {vs_base['diff']:+.3f} [{vs_base['low']:+.3f}, {vs_base['high']:+.3f}] | 12 | b (0.667) | "
            f"{maj['diff']:+.3f} [{maj['low']:+.3f}, {maj['high']:+.3f}] |") in md
    assert md.index("| cache |") < md.index("| train |") < md.index("| eval |") and "<details><summary>Recipe (resolved)</summary>" in md
    assert yaml.safe_load(md.split("```yaml\n")[1].split("```")[0])["name"] == "tiny"
    for name in ("scores", "train_loss"):
        rel = report["plots"][name]
        assert f"]({rel})" in md  # a relative link, next to report.md
        data = (run / rel).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "## Students against the best merge" in stdout and "<details>" not in stdout


@pytest.mark.slow
def test_harness_scores_reach_scores_json_and_report(tiny_run, capsys):
    """`distill eval --harness boolq_local` (offline, the shipped data copy): its accuracy is a column of
    scores.json and of the report, with n and per-example predictions for the paired difference."""
    pytest.importorskip("lm_eval")
    from distill.cli import main

    run, _ = tiny_run
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    recipe["eval"].update(tasks=[], limit=3, batch_size=2, teachers=False, skills={},
                          models=[m for m in recipe["eval"]["models"] if m["name"] == "avg"])
    path = write_recipe(run.parent / "h.yaml", recipe)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(path), "--harness", "boolq_local"])
    assert e.value.code == 0, capsys.readouterr().err
    scores = json.loads((run / "eval" / "scores.json").read_text())
    harness = json.loads((run / "eval" / "harness" / "student" / "harness.json").read_text())
    got = scores["student"]["boolq_local"]
    assert got["accuracy"] == harness["results"]["boolq_local"]["acc,none"] and got["n"] == 3
    assert got["source"] == "lm-eval" and got["metric"] == "acc,none"
    report = json.loads((run / "report.json").read_text())
    assert report["tasks"] == ["boolq_local"] and report["n"]["student"]["boolq_local"] == 3
    assert report["vs_best_merge"]["student"]["boolq_local"]["n"] == 3
    md = (run / "report.md").read_text()
    assert "boolq_local" in md and f"{got['accuracy']:.3f} [" in md


def test_the_mean_counts_each_skill_once(tiny_world, tmp_path):
    """With eval.skills, the mean (and so the best merge) is over the skills' tasks: a second view
    of one skill (boolq_standard beside boolq) is shown but does not count that skill twice."""
    from distill.config import load_recipe
    from distill.report import build

    ev = {"tasks": ["a", "a_view", "b"], "skills": {"ta": "a", "tb": "b"},
          "models": [{"name": "m1", "merge": ["ta", "tb"]}, {"name": "m2", "merge": ["ta", "tb"], "method": "ties",
                                                                       "density": 0.5, "base": str(tiny_world["base"])}]}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", eval=ev)))
    acc = {"m1": {"a": 0.5, "a_view": 1.0, "b": 0.5}, "m2": {"a": 0.5, "a_view": 0.0, "b": 0.75},
           "student": {"a": 0.75, "a_view": 0.0, "b": 0.75}}
    scores = {}
    for model, row in acc.items():
        for task, a in row.items():
            rows = [{"index": i, "correct": i < 4 * a} for i in range(4)]
            path = tmp_path / "run" / "eval" / model / f"{task}.predictions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            scores.setdefault(model, {})[task] = {"accuracy": a, "n": 4, "predictions": f"{model}/{task}.predictions.jsonl"}
    report = build(recipe, scores)
    assert report["mean_tasks"] == ["a", "b"] and report["tasks"] == ["a", "a_view", "b"]
    # over all three tasks m1 would win (0.667 against 0.417); over the two skills m2 does
    assert report["mean"]["m1"] == pytest.approx(0.5) and report["mean"]["m2"] == pytest.approx(0.625)
    assert report["best_merge"] == "m2"
    vs = report["vs_best_merge"]["student"]
    assert vs["a_view"]["diff"] == 0 and vs["mean"]["diff"] == pytest.approx((0.25 + 0.0) / 2)
    from distill.report import markdown
    assert "The mean is over the skills' tasks: a, b." in markdown(report, "name: tiny\n")
