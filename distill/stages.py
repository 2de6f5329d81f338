"""The stages behind the CLI. Each reads and writes only the run directory.

    <run>/recipe.resolved.yaml    the recipe as run (overrides applied, placeholders filled)
    <run>/cache/                  teacher cache (see distill/cache/store.py)
    <run>/checkpoints/step-*/     training checkpoints; <run>/student/ the trained student
    <run>/train_log.jsonl, <run>/train_result.json
    <run>/baselines/<name>/       merge baselines (uniform weight average of teachers)
    <run>/eval/                   scores.json, scores.md, <model>/<task>.predictions.jsonl,
                                  harness/<model>/ (lm-eval tasks: harness.json, <task>.predictions.jsonl)
    <run>/timings.json            {stage: {wall_s, finished}}: each stage's wall time, its last run
    <run>/report.md, report.json  the run's summary table; <run>/plots/*.png its figures
    <run>/publish/                what `distill publish` pushes: model folder + README.md model card
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from distill.config import Recipe, load_recipe, recipe_dict
from distill.errors import DistillError
from distill.secrets import redact


TIMINGS = "timings.json"


def record_time(recipe: Recipe, stage: str, started: float) -> None:
    """Add `stage`'s wall time since `started` to <run>/timings.json (the report's stage times).

    Only the main process writes: under `accelerate launch` every rank runs the stage."""
    from distill.distributed import partial_state
    from distill.files import write_json_atomic

    state = partial_state()
    if state is not None and not state.is_main_process:
        return
    path = Path(recipe.run_dir) / TIMINGS
    try:
        timings = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        timings = {}  # a hand-edited or foreign file: start again rather than fail a finished stage
    timings[stage] = {"wall_s": round(time.time() - started, 3),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, timings)


def load(path: str, overrides: list[str]) -> Recipe:
    return load_recipe(path, overrides)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): obj}
    return {prefix.rstrip("."): obj}


def explain(recipe: Recipe, recipe_path: str, overrides: list[str]) -> list[str]:
    """One line per leaf: `key: value  (recipe | override | default)`."""
    raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    given = set(_flatten(raw))
    over = {o.split("=", 1)[0].strip() for o in overrides}
    lines = []
    for key, value in _flatten(recipe_dict(recipe)).items():
        if any(key == o or key.startswith(o + ".") for o in over):
            origin = "override"
        elif key in given or any(key.startswith(g + ".") for g in given) or key.split(".")[0] == "teachers":
            origin = "recipe"
        else:
            origin = "default"
        lines.append(f"{key}: {value!r}  ({origin})")
    return lines


def show(recipe: Recipe, recipe_path: str, overrides: list[str]) -> None:
    print(f"recipe {recipe_path} is valid: {len(recipe.teachers)} teachers, run_dir {recipe.run_dir}")
    for line in explain(recipe, recipe_path, overrides):
        print("  " + line)


def prepare_run_dir(recipe: Recipe, recipe_path: str, overrides: list[str], log=print) -> Path:
    run = Path(recipe.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact(recipe_dict(recipe)), sort_keys=False)  # no credential-like value on disk
    (run / "recipe.resolved.yaml").write_text(text)
    set_lines = [ln for ln in explain(recipe, recipe_path, overrides) if not ln.endswith("(default)")]
    log(f"run {recipe.name} -> {run} ({len(set_lines)} values set by the recipe or overrides, "
        "the rest defaulted; full list in recipe.resolved.yaml)")
    for ln in set_lines:
        if ln.endswith("(override)"):
            log(f"  {ln}")
    return run


def verify_cache(path: str) -> None:
    from distill.cache.store import CacheReader

    p = Path(path)
    if not (p / "manifest.json").exists() and (p / "cache").is_dir():  # a run directory
        p = p / "cache"
    reader = CacheReader(p, verify="rehash")  # every hash, whatever the stamp says, before any file is parsed
    m = reader.manifest
    n_files = sum(len(s["files"]) for s in m["shards"].values())
    print(f"cache {p}: OK ({len(m['shards'])} shards, {n_files} files, {m['data']['samples']} samples, "
          f"{m['data']['targets']} target tokens x {len(m['teachers'])} teachers, all sha256 match)")


def cache(recipe: Recipe, state=None, log=print):
    from distill.cache.capture import run_capture

    started = time.time()
    report = run_capture(recipe, state)
    record_time(recipe, "cache", started)
    total = report.forward_s + report.encode_s + report.write_s
    log(f"cache: {report.cache_dir}: {report.shards_done} shard-teacher groups written, "
        f"{report.shards_skipped} shards already complete; data: {report.data_summary}; "
        f"forward {report.forward_s:.1f}s, encode {report.encode_s:.1f}s, write {report.write_s:.1f}s"
        + (f", id order {report.extra['id_order_s']:.1f}s" if "id_order_s" in report.extra else "")
        + (f" (overhead {100 * (report.encode_s + report.write_s) / max(report.forward_s, 1e-9):.1f}%)"
           if total else ""))
    return report


def train(recipe: Recipe, resume: bool = False, start: float | None = None, log=print):
    from distill.train import run_train

    started = time.time()
    result = run_train(recipe, resume=resume, start=start, log=log)
    record_time(recipe, "train", started)
    return result


def evaluate(recipe: Recipe, harness: str | None = None, log=print) -> dict:
    from distill.evaluation import evaluate_models, harness_record, harness_scores
    from distill.evaluation.runner import write_scores
    from distill.model_entries import eval_entries
    from distill.report import write_report

    started = time.time()
    if not recipe.eval.tasks and not harness:
        raise DistillError("eval.tasks: no tasks to evaluate (list task names or spec paths)")
    entries = eval_entries(recipe, log)
    out = Path(recipe.run_dir) / "eval"
    scores = evaluate_models(entries, recipe.eval.tasks, recipe.eval, out, log=log) if recipe.eval.tasks else {}
    if harness:
        names = [h.strip() for h in harness.split(",") if h.strip()]
        for e in entries:
            record = harness_record(e, names, out / "harness", limit=recipe.eval.limit,
                                    batch_size=recipe.eval.batch_size)
            for task, metrics in harness_scores(record).items():
                if task in scores.get(e.name, {}):
                    raise DistillError(f"--harness {task}: a task of eval.tasks has that name too; "
                                       "run one of them under another name")
                scores.setdefault(e.name, {})[task] = metrics
            write_scores(out, scores, recipe.eval.protocol, recipe.eval.limit)
    record_time(recipe, "eval", started)
    write_report(recipe, scores, log)
    return scores


def publish(recipe: Recipe, dry_run: bool = False, log=print) -> None:
    from distill.publish import publish_student

    publish_student(recipe, dry_run=dry_run, log=log)


def run_all(recipe: Recipe, state=None, resume: bool = False, dry_run: bool = False,
            start: float | None = None, log=print) -> None:
    """cache -> train -> eval (-> publish when publish.push or --dry-run).

    `start`: when the command began (default: now), for the closing line. train.budget_minutes is
    counted from the start of the train stage, so the cache stage is not charged to it.
    """
    start = time.time() if start is None else start
    if state is not None and state.num_processes > 1:
        raise DistillError("`distill run` chains stages in one process; launch `distill cache` and "
                           "`distill train` with accelerate separately")
    cache(recipe, None, log)
    train_start = time.time()
    train(recipe, resume=resume, start=train_start, log=log)
    if recipe.eval.tasks:
        evaluate(recipe, log=log)
    if recipe.publish.push or dry_run:
        publish(recipe, dry_run=dry_run, log=log)
    log(f"run: done in {time.time() - start:.0f}s; the train budget started {train_start - start:.0f}s in, "
        "after the cache stage")
