"""Evaluate models on tasks and write the results: the body of `distill eval`.

    from distill.evaluation import ModelEntry, evaluate_models
    scores = evaluate_models([ModelEntry("student", load_student)], ["boolq", "mawps"], recipe.eval, run_dir / "eval")

Writes, under out_dir:
    <model>/<task>.predictions.jsonl   one line per example
    scores.json                        {model: {task: {accuracy, n, wall_s, examples_per_s, tokens_per_s,
                                                    peak_mem_mb, version[, protocol][, cached]}}}
    scores.md                          models as rows, tasks as columns, then the speed figures

Every task file and data file is read and checked before the first model is
loaded; models are loaded one at a time, lazily, and freed after their tasks.
Results are cached by what made them (distill/evaluation/cache.py): a model whose
every task is cached is not loaded at all, and its scores are marked `cached: true`.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from distill.errors import DistillError
from distill.evaluation.batching import model_device
from distill.evaluation.cache import EvalCache, default_cache_dir, task_fingerprint
from distill.evaluation.examples import Example, build_examples
from distill.evaluation.generation import generate
from distill.evaluation.loglik import PROTOCOLS, score_choices_protocols
from distill.evaluation.meter import Meter
from distill.evaluation.scorers import SCORERS
from distill.evaluation.spec import TaskSpec, load_task
from distill.progress import progress


@dataclass
class ModelEntry:
    """A model to evaluate. `load` is called only when its turn comes, so one model is in memory at a time."""

    name: str
    load: Callable[[], tuple[Any, Any]]  # () -> (PreTrainedModel, PreTrainedTokenizerBase)
    # (HashCache) -> content hash of the model's files, taken without loading it; None (or a
    # None result): the model cannot be told apart from another (e.g. built in memory), never cached
    fingerprint: Optional[Callable[[Any], Optional[str]]] = None


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_entry(entry: ModelEntry, device: torch.device):
    """Call entry.load() and place the model for inference: eval mode, on `device`, bf16 on GPU."""
    try:
        model, tokenizer = entry.load()
    except DistillError:
        raise
    except (OSError, ValueError) as exc:  # transformers' "not a folder or Hub id", bad config.json, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"model {entry.name!r}: cannot load: {first}") from None
    model.eval()
    placed = getattr(model, "hf_device_map", None) is not None or getattr(model, "is_quantized", False)
    if not placed:
        model.to(device)
        if device.type == "cuda" and getattr(model, "dtype", None) == torch.float32:
            model.to(torch.bfloat16)  # halves memory and time; scored logits are fp32 (logits.model_logits(fp32=True))
    return model, tokenizer


def run_task(model, tokenizer, spec: TaskSpec, examples: list[Example], protocol: str = "competition",
             batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Evaluate one loaded model on one task. Returns (metrics, per-example records)."""
    if spec.kind == "multiple_choice":
        return run_choice_tasks(model, tokenizer, [spec], examples, [protocol], batch_size)[0]
    prompts = [ex.prompt for ex in examples]
    bar = progress(total=len(examples), desc=f"eval {spec.name}", unit="examples")
    with Meter(model_device(model)) as meter:
        texts, n_tokens = generate(model, tokenizer, prompts, spec.max_new_tokens, spec.stop, batch_size,
                                   spec.add_bos, spec.max_prompt_tokens, on_batch=bar.update)
    bar.close()
    records = []
    for i, ex in enumerate(examples):
        prediction, correct = SCORERS[spec.kind](texts[i], ex.target)
        records.append({"index": ex.index, "prompt": ex.prompt, "target": ex.target, "generated": texts[i],
                        "prediction": prediction, "correct": bool(correct)})
    return _metrics(spec, records, meter.wall_s, n_tokens, meter.peak_mem_mb), records


def run_choice_tasks(model, tokenizer, specs: list[TaskSpec], examples: list[Example], protocols: list[str],
                     batch_size: int = 16) -> list[tuple[dict, list[dict]]]:
    """Multiple-choice tasks that are views of the same examples (same prompts, choices and prompt
    tokenization; see `shared_views`), task i under protocols[i], in shared passes
    (loglik.score_choices_protocols). Returns (metrics, records) per task. With several tasks, each
    one's wall time is its share of the shared pass (the total over the tasks) and its metrics
    name the others under `shared_pass_with`."""
    spec = specs[0]
    label = "+".join(s.name for s in specs)
    bar = progress(total=len(examples), desc=f"eval {label}", unit="examples")
    with Meter(model_device(model)) as meter:
        scores, n_tokens = score_choices_protocols(
            model, tokenizer, [ex.prompt for ex in examples], [ex.choices for ex in examples],
            list(dict.fromkeys(protocols)), batch_size, spec.add_bos, spec.max_prompt_tokens, on_batch=bar.update)
    bar.close()
    out = []
    for task, protocol in zip(specs, protocols):
        records = []
        for i, ex in enumerate(examples):
            s = scores[protocol][i]
            pred = max(range(len(ex.choices)), key=lambda c: s[c])  # the first of equal scores, as torch.max
            records.append({"index": ex.index, "prompt": ex.prompt, "target": ex.target, "template": ex.template,
                            "choices": list(ex.choices), "scores": s, "label": ex.label, "pred_index": pred,
                            "prediction": ex.choices[pred], "correct": pred == ex.label})
        share = len(specs)
        metrics = _metrics(task, records, meter.wall_s / share, n_tokens / share, meter.peak_mem_mb)
        metrics["protocol"] = protocol
        if share > 1:
            metrics["shared_pass_with"] = [s.name for s in specs if s is not task]
        out.append((metrics, records))
    return out


def _metrics(spec: TaskSpec, records: list[dict], wall_s: float, n_tokens: float, peak_mem_mb: float) -> dict:
    n = len(records)
    return {
        "accuracy": sum(r["correct"] for r in records) / n,
        "n": n,
        "wall_s": round(wall_s, 3),
        "examples_per_s": round(n / wall_s, 3) if wall_s > 0 else None,
        "tokens_per_s": round(n_tokens / wall_s, 1) if wall_s > 0 else None,
        "peak_mem_mb": round(peak_mem_mb, 1),
        "version": spec.version,
    }


def shared_views(specs: list[TaskSpec], examples: dict[str, list[Example]]) -> list[list[TaskSpec]]:
    """Group multiple-choice tasks whose examples are the same prompts and choices, tokenized the
    same way (add_bos, max_prompt_tokens): boolq and boolq_standard, say. Each group is scored in
    shared passes; every other task is a group of its own. Order: each group at its first task."""
    groups: dict[Any, list[TaskSpec]] = {}
    for spec in specs:
        key: Any = spec.name
        if spec.kind == "multiple_choice":
            key = (spec.add_bos, spec.max_prompt_tokens,
                   tuple((ex.prompt, tuple(ex.choices)) for ex in examples[spec.name]))
        groups.setdefault(key, []).append(spec)
    return list(groups.values())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def write_predictions(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _num(value, fmt: str = "") -> str:
    """A figure, or "-" where there is none (lm-eval tasks have no speed or memory figures)."""
    return "-" if value is None else format(value, fmt)


def scores_markdown(scores: dict, protocol: str, limit: Optional[int]) -> str:
    """Accuracy table (models as rows, tasks as columns), then one speed row per (model, task)."""
    tasks = list(dict.fromkeys(t for per_model in scores.values() for t in per_model))
    subset = f"first {limit} examples per task" if limit else "full tasks"
    own = {t: m["protocol"] for per_model in scores.values() for t, m in per_model.items()
           if m.get("protocol") not in (None, protocol)}  # tasks whose spec sets its own protocol
    if own:
        protocol += " (" + ", ".join(f"{t}: {p}" for t, p in own.items()) + ")"
    lines = [f"Accuracy (%), {subset}; multiple-choice protocol: {protocol}.", "",
             "| model | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for model, per_model in scores.items():
        cells = [_num(100 * per_model[t]["accuracy"] if per_model[t].get("accuracy") is not None else None, ".2f")
                 if t in per_model else "" for t in tasks]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | task | n | wall s | examples/s | tokens/s | peak MB |", "| --- | --- |" + " ---: |" * 5]
    for model, per_model in scores.items():
        for t, m in per_model.items():
            lines.append(f"| {model} | {t} | {m['n']} | {_num(m['wall_s'], '.1f')} | {_num(m['examples_per_s'])} | "
                         f"{_num(m['tokens_per_s'])} | {_num(m['peak_mem_mb'], '.0f')} |")
    return "\n".join(lines) + "\n"


def write_scores(out_dir: Path, scores: dict, protocol: str, limit: Optional[int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out_dir / "scores.md").write_text(scores_markdown(scores, protocol, limit))


def evaluate_models(models: list[ModelEntry], tasks: list[str], cfg, out_dir, device=None,
                    log: Callable[[str], None] = print) -> dict:
    """Evaluate each model on each task; write predictions, scores.json and scores.md.

    cfg: an EvalConfig (uses limit, batch_size, protocol, cache, cache_dir). Scores are rewritten
    after every task, so an interrupted run keeps what it finished.
    """
    out_dir = Path(out_dir)
    if not tasks:
        raise DistillError("eval.tasks: no tasks to evaluate (give task names or spec paths)")
    if cfg.protocol not in PROTOCOLS:
        raise DistillError(f"eval.protocol: expected one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    specs = [load_task(t) for t in tasks]
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise DistillError(f"eval.tasks: two tasks are named {name!r}; task names must be unique")
    if not models:
        raise DistillError("eval: no models to evaluate (enable eval.student / eval.teachers or list eval.models)")
    folders = [_safe(m.name) for m in models]
    for m, folder in zip(models, folders):
        if folders.count(folder) > 1:  # also catches "a/b" vs "a_b", which share a folder
            raise DistillError(f"eval: model name {m.name!r} is not unique (output folder {folder!r})")
    examples = {s.name: build_examples(s, cfg.limit) for s in specs}  # fail on bad data before loading models
    device = resolve_device(device)
    cache = _open_cache(cfg, log)
    task_fps = {s.name: task_fingerprint(s, examples[s.name]) for s in specs} if cache else {}
    scores: dict[str, dict] = {}
    for entry in models:
        keys, hits = _lookup(cache, entry, specs, task_fps, cfg, device)
        model = tokenizer = None
        if len(hits) < len(specs):  # decided before loading: a fully cached model is never loaded
            model, tokenizer = load_entry(entry, device)
        scores[entry.name] = {}
        # Views of the same examples under other protocols (boolq, boolq_standard) share their passes.
        shared: dict[str, tuple[dict, list[dict]]] = {}
        for group in shared_views([s for s in specs if s.name not in hits], examples):
            if len(group) > 1:
                results = run_choice_tasks(model, tokenizer, group, examples[group[0].name],
                                           [s.protocol_under(cfg.protocol) for s in group], cfg.batch_size)
                for s, (metrics, records) in zip(group, results):
                    shared[s.name] = metrics, records
                    if s.name in keys:  # at once: an interrupted run keeps what it finished
                        cache.put(keys[s.name], metrics, records)
        for spec in specs:
            if spec.name in hits:
                metrics, records = hits[spec.name]
                metrics = {**metrics, "cached": True}
            elif spec.name in shared:
                metrics, records = shared[spec.name]
            else:
                metrics, records = run_task(model, tokenizer, spec, examples[spec.name],
                                            spec.protocol_under(cfg.protocol), cfg.batch_size)
                if spec.name in keys:
                    cache.put(keys[spec.name], metrics, records)
            write_predictions(out_dir / _safe(entry.name) / f"{spec.name}.predictions.jsonl", records)
            # Where the report finds the per-example records, relative to out_dir.
            scores[entry.name][spec.name] = {**metrics, "predictions": f"{_safe(entry.name)}/{spec.name}.predictions.jsonl"}
            write_scores(out_dir, scores, cfg.protocol, cfg.limit)
            log(f"eval {entry.name} {spec.name}: accuracy {metrics['accuracy']:.4f} on {metrics['n']} examples, "
                + ("cached (an earlier run scored the same model, task and settings)" if spec.name in hits else
                   f"{metrics['wall_s']:.1f} s, {metrics['examples_per_s']} ex/s, peak {metrics['peak_mem_mb']:.0f} MB"))
        del model, tokenizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return scores


def _open_cache(cfg, log) -> Optional[EvalCache]:
    if not getattr(cfg, "cache", True):
        return None
    root = getattr(cfg, "cache_dir", None)
    return EvalCache(Path(root).expanduser() if root else default_cache_dir(), log)


def _lookup(cache: Optional[EvalCache], entry: ModelEntry, specs: list[TaskSpec], task_fps: dict, cfg,
            device: torch.device) -> tuple[dict[str, dict], dict[str, tuple]]:
    """({task: cache key fields}, {task: cached (metrics, records)}) for one model; empty when uncached."""
    if cache is None or entry.fingerprint is None:
        return {}, {}
    model_fp = entry.fingerprint(cache.hashes)
    cache.hashes.save()
    if model_fp is None:
        return {}, {}
    keys = {s.name: cache.key_fields(model_fp, task_fps[s.name], s, s.protocol_under(cfg.protocol), cfg.limit,
                                     cfg.batch_size, device.type) for s in specs}
    hits = {name: hit for name, fields in keys.items() if (hit := cache.get(fields)) is not None}
    return keys, hits
