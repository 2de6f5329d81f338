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
scoring rules apply (not distill's protocols). Writes <out_dir>/<model>/harness.json.
"""

from __future__ import annotations

import json
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


def run_harness(entry, harness_tasks: list[str], out_dir, limit: Optional[int] = None, batch_size: int = 16,
                device=None) -> dict:
    """Run lm-eval tasks on entry's model; returns lm-eval's per-task results ({task: {metric: value}})."""
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
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                          batch_size=batch_size, log_samples=False)
    except KeyError as exc:  # lm-eval's "not a registered task" error
        raise DistillError(f"--harness: {exc.args[0] if exc.args else exc}") from None
    per_task = results["results"]
    folder = Path(out_dir) / _safe(entry.name)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"results": per_task, "versions": results.get("versions"), "n-samples": results.get("n-samples"),
              "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", None)}
    (folder / "harness.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return per_task
