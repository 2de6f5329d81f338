"""lm-evaluation-harness bridge: run lm-eval tasks on the model object distill already loaded.

    from distill.evaluation import ModelEntry, run_harness
    results = run_harness(ModelEntry("student", load), ["boolq_local"], "runs/x/eval", limit=100)
    results["boolq_local"]["acc,none"]

Each task is one of:
- a name of a YAML under eval/harness/ (shipped: boolq_local, lm-eval's boolq over the
  local data copy, so it runs offline);
- the path of an lm-eval task YAML; relative `dataset_kwargs.data_files` paths in it
  are resolved against the YAML's folder;
- any task name lm-eval knows (`boolq`, `arc_easy`, ...); those fetch their data from
  the Hub, so they need network.
The model is wrapped with `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)` and run through `lm_eval.simple_evaluate`; lm-eval's own
scoring rules apply (not distill's protocols). Writes <out_dir>/<model>/harness.json and
<out_dir>/<model>/<task>.predictions.jsonl ({index: lm-eval's doc_id, correct}, one line per
example, as distill's own tasks write them, so the report pairs models on the same examples).
`harness_scores(record)` turns harness.json into scores.json entries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from distill.errors import DistillError
from distill.evaluation.spec import EVAL_DIR

HARNESS_DIR = EVAL_DIR / "harness"
INSTALL_HINT = "pip install lm_eval==0.4.13"


def _resolve_data_files(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return str((base / value).resolve()) if not Path(value).is_absolute() and "://" not in value else value
    if isinstance(value, list):
        return [_resolve_data_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base) for k, v in value.items()}
    return value


def _local_config(path: Path) -> dict:
    """A local task YAML as an lm-eval config dict, with its data paths made absolute."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DistillError(f"{path}: cannot read harness task: {type(exc).__name__}") from None
    if not isinstance(config, dict) or "task" not in config:
        raise DistillError(f"{path}: an lm-eval task YAML needs a `task` key")
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _resolve_data_files(kwargs["data_files"], path.parent)}
    return config


def harness_task_specs(harness_tasks: list[str]) -> list[str | dict]:
    """Names become config dicts when a local YAML provides them; other names pass through to lm-eval."""
    specs: list[str | dict] = []
    for task in harness_tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise DistillError(f"harness task {task!r}: file not found")
            specs.append(_local_config(path))
        elif (HARNESS_DIR / f"{task}.yaml").is_file():
            specs.append(_local_config(HARNESS_DIR / f"{task}.yaml"))
        else:
            specs.append(task)
    return specs


PRIMARY_METRICS = ("acc", "exact_match")  # the metric a harness task's accuracy column shows, first found


def _primary_metric(metrics: dict) -> str | None:
    for name in PRIMARY_METRICS:
        key = next((k for k in metrics if k.split(",")[0] == name), None)
        if key is not None and isinstance(metrics[key], (int, float)):
            return key
    return None


def harness_scores(record: dict) -> dict[str, dict]:
    """harness.json -> {task: {accuracy, n, metric, stderr, source: "lm-eval", wall_s, ...}} for scores.json.

    A task without an `acc` or `exact_match` metric keeps its raw metrics only (accuracy None)."""
    out = {}
    for task, metrics in record["results"].items():
        key = _primary_metric(metrics)
        n = (record.get("n-samples") or {}).get(task, {}).get("effective")
        stderr = metrics.get(key.replace(",", "_stderr,", 1)) if key else None
        wall = record.get("wall_s")
        out[task] = {"accuracy": float(metrics[key]) if key else None, "n": n, "metric": key,
                     "stderr": stderr if isinstance(stderr, (int, float)) else None, "source": "lm-eval",
                     "version": (record.get("versions") or {}).get(task), "wall_s": wall,
                     "examples_per_s": None, "tokens_per_s": None, "peak_mem_mb": None,
                     "predictions": f"harness/{record['model_folder']}/{task}.predictions.jsonl",
                     "harness": {k: v for k, v in metrics.items() if k != "alias"}}
    return out


def _write_samples(folder: Path, samples: dict) -> None:
    from distill.evaluation.runner import write_predictions

    for task, rows in samples.items():
        key = _primary_metric(rows[0]) if rows else None
        if key is None:
            continue
        records = [{"index": r["doc_id"], "target": str(r.get("target")), "correct": bool(r[key])} for r in rows]
        write_predictions(folder / f"{task}.predictions.jsonl", sorted(records, key=lambda r: r["index"]))


def run_harness(entry, harness_tasks: list[str], out_dir, limit: Optional[int] = None, batch_size: int = 16,
                device=None) -> dict:
    """Run lm-eval tasks on entry's model; returns lm-eval's per-task results ({task: {metric: value}})."""
    return harness_record(entry, harness_tasks, out_dir, limit, batch_size, device)["results"]


def harness_record(entry, harness_tasks: list[str], out_dir, limit: Optional[int] = None, batch_size: int = 16,
                   device=None) -> dict:
    """run_harness, returning the whole record written to harness.json (results, versions, n-samples, wall_s)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DistillError(f"--harness needs lm-evaluation-harness: {INSTALL_HINT}") from None
    from distill.evaluation.runner import _safe, load_entry, resolve_device

    if not harness_tasks:
        raise DistillError("--harness: no tasks given")
    specs = harness_task_specs(harness_tasks)
    # Indexing lm-eval's ~10k built-in YAMLs takes seconds; skip it when every task is local.
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    device = resolve_device(device)
    model, tokenizer = load_entry(entry, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    start = time.time()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                          batch_size=batch_size, log_samples=True)
    except KeyError as exc:  # lm-eval's "not a registered task" error
        raise DistillError(f"--harness: {exc.args[0] if exc.args else exc}") from None
    wall = time.time() - start
    folder = Path(out_dir) / _safe(entry.name)
    folder.mkdir(parents=True, exist_ok=True)
    _write_samples(folder, results.get("samples") or {})
    record = {"results": results["results"], "versions": results.get("versions"),
              "n-samples": results.get("n-samples"), "limit": limit, "wall_s": round(wall, 3),
              "model_folder": folder.name,
              "lm_eval_version": getattr(lm_eval, "__version__", None)}
    (folder / "harness.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
