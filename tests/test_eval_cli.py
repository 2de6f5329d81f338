"""`distill eval` through the CLI: outputs on disk, and one-line errors with exit 2 for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_recipe, write_recipe
from distill.cli import main


@pytest.fixture
def eval_run(tiny_world, tmp_path):
    rows = [{"prompt": f"{i}+1=", "target": str(i + 1)} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "inc.yaml").write_text("kind: generate_exact\ndataset: t.jsonl\nmax_new_tokens: 3\n")

    def make(**eval_section):
        recipe = tiny_recipe(tiny_world, tmp_path / "run",
                             eval={"tasks": [str(tmp_path / "inc.yaml")], "student": False, **eval_section})
        return write_recipe(tmp_path / "r.yaml", recipe)
    return make


def _run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_eval_writes_scores_predictions_and_report(eval_run, tmp_path, capsys):
    path = eval_run(models=[{"name": "avg", "merge": ["ta", "tb"]}], limit=4)
    code, _ = _run(["eval", str(path)], capsys)
    assert code == 0
    run = tmp_path / "run"
    scores = json.loads((run / "eval" / "scores.json").read_text())
    models = scores.get("models", scores)
    assert {"avg", "ta", "tb"} <= set(models)
    preds = (run / "eval" / "ta" / "inc.predictions.jsonl").read_text().splitlines()
    assert len(preds) == 4  # eval.limit
    report = json.loads((run / "report.json").read_text())
    assert set(report["scores"]) == {"avg", "ta", "tb"}
    assert (run / "baselines" / "avg" / "config.json").exists()


@pytest.mark.parametrize("case", ["unknown_task", "missing_kind", "missing_data_field", "bad_model_path"])
def test_eval_bad_input_one_line_exit_2(eval_run, tiny_world, tmp_path, capsys, case):
    if case == "unknown_task":
        path = eval_run(tasks=["no_such_task"])
        expect = "no_such_task"
    elif case == "missing_kind":
        (tmp_path / "bad.yaml").write_text("dataset: t.jsonl\n")
        path = eval_run(tasks=[str(tmp_path / "bad.yaml")])
        expect = "kind"
    elif case == "missing_data_field":
        (tmp_path / "bad.yaml").write_text("kind: generate_exact\ndataset: t.jsonl\ntarget_field: answer\n")
        path = eval_run(tasks=[str(tmp_path / "bad.yaml")])
        expect = "answer"
    else:
        broken = tmp_path / "broken_model"
        shutil.copytree(tiny_world["ta"], broken)
        (broken / "model.safetensors").write_bytes(b"garbage")
        path = eval_run(models=[{"name": "broken", "model": str(broken)}])
        expect = "broken"
    code, out = _run(["eval", str(path)], capsys)
    err = out.err.strip()
    assert code == 2, err
    assert err.startswith("distill: error: ") and "\n" not in err and expect in err, err
