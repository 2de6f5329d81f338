"""The run report: one table of every evaluated model on every task, plus retention.

Retention (`eval.skills`: teacher -> the task of its own skill) is the student's
score divided by that teacher's score on that task: the consolidation figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import Recipe

PRIMARY = ("accuracy", "exact_match", "acc")


def primary(metrics: dict) -> float | None:
    for key in PRIMARY:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def _task_key(task: str) -> str:
    return Path(task).stem if task.endswith((".yaml", ".yml", ".json")) else task


def retention(recipe: Recipe, table: dict[str, dict[str, float | None]]) -> dict[str, dict]:
    out = {}
    student = table.get("student", {})
    for teacher, task in recipe.eval.skills.items():
        t_score, s_score = table.get(teacher, {}).get(task), student.get(task)
        ratio = None if not t_score or s_score is None else s_score / t_score
        out[teacher] = {"task": task, "teacher": t_score, "student": s_score, "retention": ratio}
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_report(recipe: Recipe, scores: dict, log=print) -> dict:
    run = Path(recipe.run_dir)
    tasks: list[str] = []
    table: dict[str, dict[str, float | None]] = {}
    for model, per_task in scores.items():
        for task, metrics in per_task.items():
            if not isinstance(metrics, dict) or task == "harness":
                continue
            key = metrics.get("task", task)
            if key not in tasks:
                tasks.append(key)
            table.setdefault(model, {})[key] = primary(metrics)
    ret = retention(recipe, table)
    train = json.loads((run / "train_result.json").read_text()) if (run / "train_result.json").exists() else None
    report = {"recipe": recipe.name, "scores": table, "retention": ret, "train": train}
    (run / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# distill report: {recipe.name}", "", "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for model, row in table.items():
        cells = [_fmt(row.get(t)) for t in tasks]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if ret:
        lines += ["", "| teacher | its task | teacher | student | retention |", "|---|---|---|---|---|"]
        for name, r in ret.items():
            pct = "-" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
            lines.append(f"| {name} | {r['task']} | {_fmt(r['teacher'])} | {_fmt(r['student'])} | {pct} |")
    if train:
        lines += ["", f"Training: {train['steps']}/{train['planned_steps']} steps, {train['tokens']} target tokens, "
                      f"{train['wall_s']:.1f}s, stopped by {train['stopped_by']}."]
    text = "\n".join(lines) + "\n"
    (run / "report.md").write_text(text)
    log(text)
    return report
