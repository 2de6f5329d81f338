"""The run report: <run>/report.md (with <run>/plots/*.png) and <run>/report.json, from eval/scores.json.

What it shows, and how each figure is identified:
- every evaluated model on every task (distill's tasks and `--harness` lm-eval tasks), with the
  sample size and a 95% Wilson score interval (distill/stats.py);
- students: the model named `student` (the run's own) and any eval model named `student_*`;
  merge baselines: the `eval.models` entries with a `merge` list; the best merge is the one with
  the highest mean accuracy. The mean is over the skills' tasks (the tasks `eval.skills` names, so
  one skill counts once however many views of it are evaluated, e.g. boolq and boolq_standard), or
  over every task when `eval.skills` names none that was evaluated. Each student's paired difference to it is computed on
  the examples both scored (from <run>/eval/.../<task>.predictions.jsonl);
- retention (`eval.skills`: expert -> the task of its own skill): student / expert, and the gain
  kept, (student - base) / (expert - base), where the base is the eval model named `base`;
- the stage wall times (<run>/timings.json, written by distill/stages.py) and the training run;
- the resolved recipe, collapsed.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distill import plots, stats
from distill.config import Recipe, recipe_dict
from distill.evaluation.runner import _safe

PRIMARY = ("accuracy", "exact_match", "acc")
BASE = "base"
STAGES = ("cache", "train", "eval")  # the order stage times are listed in


def primary(metrics: dict) -> float | None:
    for key in PRIMARY:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def is_student(name: str) -> bool:
    return name == "student" or name.startswith("student_")


def _cells(scores: dict) -> dict[str, dict[str, dict]]:
    """{model: {task: {accuracy, n, low, high, predictions}}}, tasks without an accuracy left out."""
    cells: dict[str, dict[str, dict]] = {}
    for model, per_task in scores.items():
        for task, metrics in per_task.items():
            acc = primary(metrics) if isinstance(metrics, dict) else None
            if acc is None:
                continue
            n = metrics.get("n")
            low, high = stats.wilson(round(acc * n), n) if n else (None, None)
            # scores.json names its predictions file; older ones did not, and used this path.
            preds = metrics.get("predictions") or f"{_safe(model)}/{task}.predictions.jsonl"
            cells.setdefault(model, {})[metrics.get("task", task)] = {
                "accuracy": acc, "n": n, "low": low, "high": high, "predictions": preds}
    return cells


def _mean(row: dict[str, dict], tasks: list[str]) -> float | None:
    return sum(row[t]["accuracy"] for t in tasks) / len(tasks) if tasks and all(t in row for t in tasks) else None


def _correct(eval_dir: Path, cell: dict) -> dict[int, float] | None:
    rows = _records(eval_dir, cell)
    return {r["index"]: float(r["correct"]) for r in rows} if rows else None


def versus_merge(cells: dict, tasks: list[str], student: str, merge: str, eval_dir: Path,
                 mean_tasks: list[str] | None = None) -> dict[str, dict]:
    """{task | "mean": paired difference student - merge} on the examples both models scored; the
    mean is over `mean_tasks` (default: every task)."""
    out = {}
    for task in tasks:
        if task not in cells[student] or task not in cells[merge]:
            continue
        a, b = _correct(eval_dir, cells[student][task]), _correct(eval_dir, cells[merge][task])
        common = sorted(set(a) & set(b)) if a is not None and b is not None else []
        if common:
            out[task] = stats.paired_difference([a[i] for i in common], [b[i] for i in common])
    mean_tasks = tasks if mean_tasks is None else mean_tasks
    if mean_tasks and all(t in out for t in mean_tasks):
        out["mean"] = stats.mean_of_differences([out[t] for t in mean_tasks])
    return out


def _records(eval_dir: Path, cell: dict) -> list[dict]:
    path = eval_dir / cell["predictions"] if cell.get("predictions") else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def versus_majority(eval_dir: Path, cell: dict) -> dict | None:
    """A multiple-choice cell against the majority-class answer on the same examples: {label, choice,
    rate, paired difference model - majority}; None for a generative task. The majority class is the
    most frequent gold label among the scored examples (BoolQ: "true"), so a model that has learnt only
    the answer's prior scores the rate and a difference of 0."""
    rows = [r for r in _records(eval_dir, cell) if "label" in r]
    if not rows:
        return None
    labels = [r["label"] for r in rows]
    label = max(sorted(set(labels)), key=labels.count)  # ties: the lowest label index
    majority = [float(x == label) for x in labels]
    return {"label": label, "choice": rows[0]["choices"][label], "rate": sum(majority) / len(majority),
            **stats.paired_difference([float(r["correct"]) for r in rows], majority)}


def experts_vs_base(recipe: Recipe, cells: dict, eval_dir: Path) -> dict[str, dict]:
    """{expert: paired difference expert - base on its own task, and for a multiple-choice task the
    expert against the majority class}: is each expert an expert at all?"""
    out = {}
    for expert, task in recipe.eval.skills.items():
        if expert in cells and BASE in cells:
            diff = versus_merge(cells, [task], expert, BASE, eval_dir).get(task)
            if diff:
                out[expert] = {"task": task, **diff}
                if task in cells[expert] and (maj := versus_majority(eval_dir, cells[expert][task])):
                    out[expert]["vs_majority"] = maj
    return out


def retention(recipe: Recipe, table: dict[str, dict[str, float | None]], student: str = "student") -> dict:
    """{expert: {task, teacher, student, base, retention, gain_kept}} for one student."""
    out = {}
    s_row, base = table.get(student, {}), table.get(BASE, {})
    for expert, task in recipe.eval.skills.items():
        t_score, s_score, b_score = table.get(expert, {}).get(task), s_row.get(task), base.get(task)
        ratio = None if not t_score or s_score is None else s_score / t_score
        out[expert] = {"task": task, "teacher": t_score, "student": s_score, "base": b_score, "retention": ratio,
                       "gain_kept": stats.gain_kept(s_score, t_score, b_score)}
    return out


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def build(recipe: Recipe, scores: dict) -> dict:
    """report.json's content; also what report.md and the plots are drawn from."""
    run = Path(recipe.run_dir)
    cells = _cells(scores)
    tasks = list(dict.fromkeys(t for row in cells.values() for t in row))
    skill_tasks = set(recipe.eval.skills.values())
    mean_tasks = [t for t in tasks if t in skill_tasks] or tasks
    table = {m: {t: c["accuracy"] for t, c in row.items()} for m, row in cells.items()}
    merges = [m.name for m in recipe.eval.models if m.merge and m.name in cells]
    means = {m: _mean(cells[m], mean_tasks) for m in merges}
    ranked = [m for m in merges if means[m] is not None]
    best = max(ranked, key=lambda m: means[m]) if ranked else None  # max keeps the first of equals
    students = [m for m in cells if is_student(m)]
    return {
        "recipe": recipe.name, "tasks": tasks, "mean_tasks": mean_tasks, "scores": table,
        "n": {m: {t: c["n"] for t, c in row.items()} for m, row in cells.items()},
        "intervals": {m: {t: [c["low"], c["high"]] for t, c in row.items()} for m, row in cells.items()},
        "mean": {m: _mean(row, mean_tasks) for m, row in cells.items()},
        "best_merge": best,
        "vs_best_merge": {s: versus_merge(cells, tasks, s, best, run / "eval", mean_tasks) for s in students}
        if best else {},
        "experts_vs_base": experts_vs_base(recipe, cells, run / "eval"),
        "retention": retention(recipe, table) if "student" in table else {},
        "retention_by_student": {s: retention(recipe, table, s) for s in students},
        "train": _read_json(run / "train_result.json"), "timings": _read_json(run / "timings.json"),
        "plots": _plots(run, cells),
    }


def _plots(run: Path, cells: dict) -> dict[str, str]:
    drawn = {"scores": plots.scores_plot(
        {m: {t: (c["accuracy"], c["low"], c["high"]) for t, c in row.items() if c["n"]} for m, row in cells.items()},
        run / "plots" / "scores.png")}
    if (run / "train_log.jsonl").exists():
        drawn["train_loss"] = plots.loss_plot(run / "train_log.jsonl", run / "plots" / "train_loss.png")
    return {k: str(p.relative_to(run)) for k, p in drawn.items() if p is not None}


def _fmt(v: float | None, sign: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if sign else f"{v:.3f}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _score_table(r: dict) -> list[str]:
    tasks = r["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for model, row in r["scores"].items():
        cells = [f"{row[t]:.3f} [{r['intervals'][model][t][0]:.3f}, {r['intervals'][model][t][1]:.3f}]"
                 if row.get(t) is not None and r["n"][model][t] else _fmt(row.get(t)) for t in tasks]
        name = f"**{model}**" if is_student(model) else model
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(r['mean'][model])} |")
    sizes = {t: sorted({r["n"][m][t] for m in r["n"] if t in r["n"][m]}, key=str) for t in tasks}
    mean_tasks = r.get("mean_tasks", tasks)
    over = "" if mean_tasks == tasks else f" The mean is over the skills' tasks: {', '.join(mean_tasks)}."
    lines += ["", "Examples per task (n): " + ", ".join(f"{t} {'/'.join(map(str, v))}" for t, v in sizes.items())
              + ". Brackets: 95% Wilson score interval of the accuracy." + over]
    return lines


def _merge_table(r: dict) -> list[str]:
    best, tasks = r["best_merge"], r["tasks"]
    lines = ["", f"## Students against the best merge ({best}, mean {r['mean'][best]:.3f})", "",
             "Paired difference student - merge on the same examples: the mean of per-example differences "
             "(1 correct, 0 wrong) with its 95% normal interval; an interval above 0 means the student is better.",
             "", "| student | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for student, diffs in r["vs_best_merge"].items():
        cells = [f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] (n={d['n']})" if d else "-"
                 for d in (diffs.get(t) for t in tasks + ["mean"])]
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    return lines


def _experts_table(r: dict) -> list[str]:
    lines = ["", f"## Each expert against the base (`{BASE}`) on its own task", "",
             "Paired difference expert - base on the same examples, with its 95% normal interval; "
             "an interval above 0 means the expert is clearly better at its skill. On a multiple-choice task, "
             "also the expert against always answering the majority class of those examples (paired the same way): "
             "an expert that has learnt only the answer's prior scores 0 there.", "",
             "| expert | its task | difference [95% interval] | n | majority class (rate) | expert - majority [95% interval] |",
             "|---|---|---|---|---|---|"]
    for name, d in r["experts_vs_base"].items():
        m = d.get("vs_majority")
        maj = (f"{m['choice']} ({m['rate']:.3f}) | {m['diff']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]" if m
               else "- | -")
        lines.append(f"| {name} | {d['task']} | {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {d['n']} | {maj} |")
    return lines


def _retention_table(r: dict) -> list[str]:
    lines = ["", "## Retention of each expert's skill", "",
             "retention = student / expert on the expert's task; gain kept = (student - base) / (expert - base), "
             f"with the eval model named `{BASE}` as the base (\"-\" without one, or when the expert does not beat it).",
             "", "| student | expert | its task | base | expert | student | retention | gain kept |",
             "|---|---|---|---|---|---|---|---|"]
    for student, rows in r["retention_by_student"].items():
        for name, x in rows.items():
            lines.append(f"| {student} | {name} | {x['task']} | {_fmt(x['base'])} | {_fmt(x['teacher'])} | "
                         f"{_fmt(x['student'])} | {_pct(x['retention'])} | {_pct(x['gain_kept'])} |")
    return lines


def _run_section(r: dict, recipe_yaml: str) -> list[str]:
    lines = []
    if "train_loss" in r["plots"]:
        lines += ["", f"![training loss per teacher]({r['plots']['train_loss']})"]
    if r["train"]:
        t = r["train"]
        lines += ["", f"Training: {t['steps']}/{t['planned_steps']} steps, {t['tokens']} target tokens, "
                      f"{t['wall_s']:.1f}s, stopped by {t['stopped_by']}."]
    if r["timings"]:
        lines += ["", "| stage | wall time | finished |", "|---|---|---|"]
        order = sorted(r["timings"], key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
        lines += [f"| {k} | {r['timings'][k]['wall_s']:.1f} s | {r['timings'][k]['finished']} |" for k in order]
    lines += ["", "<details><summary>Recipe (resolved)</summary>", "", "```yaml", recipe_yaml.rstrip(), "```", "",
              "</details>"]
    return lines


def markdown(r: dict, recipe_yaml: str) -> str:
    lines = [f"# distill report: {r['recipe']}", ""] + _score_table(r)
    if "scores" in r["plots"]:
        lines += ["", f"![scores per model and task]({r['plots']['scores']})"]
    if r["best_merge"] and r["vs_best_merge"]:
        lines += _merge_table(r)
    if r.get("experts_vs_base"):
        lines += _experts_table(r)
    if any(r["retention_by_student"].values()):
        lines += _retention_table(r)
    lines += ["", "## Run"] + _run_section(r, recipe_yaml)
    return "\n".join(lines) + "\n"


def write_report(recipe: Recipe, scores: dict, log=print) -> dict:
    run = Path(recipe.run_dir)
    report = build(recipe, scores)
    (run / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
    (run / "report.md").write_text(text)
    log(text.split("\n## Run")[0].rstrip() + f"\n\nfull report (plots, stage times, recipe): {run / 'report.md'}")
    return report
