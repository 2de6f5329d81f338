"""Evaluation time, from the recipe's tasks (their kinds, examples, limits) and the models it scores.

Per model: its load, then per task group (multiple-choice tasks over the same prompts share one
pass, as distill.evaluation.runner.shared_views groups them):
    multiple_choice   one prompt forward per example (2 P FLOPs per token) plus the choices'
                      few tokens on the shared prompt KV cache
    generate_*        the prompt forward, then max_new_tokens greedy steps per batch of
                      eval.batch_size (an upper bound: every answer runs to max_new_tokens); a
                      step costs max(2 P x batch FLOPs, every weight read once)
Prompt tokens are ASSUMED to be characters / CHARS_PER_TOKEN (English text on BPE vocabularies).
After `distill plan --measure` each task's seconds are multiplied by the measured ratio of its kind
(`Rates.eval_scale`: real seconds over these formulas' seconds on a batch of each task, scored by
the evaluation's own code), which folds in the token count, early stops and the decode overhead.
Models scored: eval.models (a merge is built first: its experts' base loaded, the merge written),
the teachers when eval.teachers, the student when eval.student; every model but a teacher is
assumed to have the student's architecture. The evaluation cache may skip unchanged models; the
estimate does not assume it.
"""

from __future__ import annotations

from distill.config import Recipe
from distill.plan import memory as M
from distill.plan.estimate import Rates
from distill.plan.specs import GroupSpec, StudentSpec

CHARS_PER_TOKEN = 4.0


def task_workloads(recipe: Recipe) -> list[dict]:
    """Per task group: kind, examples, prompt tokens (assumed), choices and max_new_tokens."""
    from distill.evaluation import build_examples, load_task
    from distill.evaluation.runner import shared_views

    specs = [load_task(name) for name in recipe.eval.tasks]
    examples = {s.name: build_examples(s, recipe.eval.limit) for s in specs}
    out = []
    for group in shared_views(specs, examples):
        spec, exs = group[0], examples[group[0].name]
        prompt_tokens = sum(len(e.prompt) for e in exs) / CHARS_PER_TOKEN
        if spec.max_prompt_tokens:
            prompt_tokens = min(prompt_tokens, spec.max_prompt_tokens * len(exs))
        choices = sum(len(e.choices or ()) for e in exs)
        out.append({"tasks": [s.name for s in group], "kind": spec.kind, "examples": len(exs),
                    "prompt_tokens": prompt_tokens, "choice_tokens": 2 * choices,
                    "max_new_tokens": spec.max_new_tokens if spec.is_generative else 0,
                    "max_prompt": max((len(e.prompt) for e in exs), default=0) / CHARS_PER_TOKEN})
    return out


def scale_kind(task: dict) -> str:
    """The key of `Rates.eval_scale` that a task group's time is measured under."""
    return "generate" if task["max_new_tokens"] else "choice"


def task_seconds(params_decoder: int, weight_bytes: float, task: dict, batch: int, rates: Rates) -> float:
    """One model's seconds on one task group, by the FLOP and bandwidth model (no measured scale)."""
    seconds = 2 * params_decoder * (task["prompt_tokens"] + task["choice_tokens"]) / rates.forward_flops
    if task["max_new_tokens"]:
        batches = -(-task["examples"] // batch)
        step = max(2 * params_decoder * batch / rates.forward_flops, weight_bytes / rates.bandwidth)
        seconds += batches * task["max_new_tokens"] * step
    return seconds


def _model_seconds(params_decoder: int, weight_bytes: float, tasks: list[dict], batch: int, rates: Rates) -> float:
    scale = rates.eval_scale or {}
    return sum(task_seconds(params_decoder, weight_bytes, t, batch, rates) * scale.get(scale_kind(t), 1.0)
               for t in tasks)


def eval_models(recipe: Recipe, groups: list[GroupSpec], st: StudentSpec, dtype: str) -> list[dict]:
    """(name, decoder params, weight bytes, is a merge) of every model the eval stage scores."""
    student_bytes = M.weight_bytes(st.params, dtype)
    models = [{"name": m.name, "decoder": st.params.decoder, "bytes": student_bytes, "merge": bool(m.merge)}
              for m in recipe.eval.models]
    if recipe.eval.teachers:
        for g in groups:
            for t in g.teachers:
                models.append({"name": t.name, "decoder": g.params.decoder + t.adapter_params,
                               "bytes": M.weight_bytes(g.params, dtype), "merge": False})
    if recipe.eval.student:
        models.append({"name": "student", "decoder": st.params.decoder, "bytes": student_bytes, "merge": False})
    return models


def eval_estimate(recipe: Recipe, groups: list[GroupSpec], st: StudentSpec, rates: Rates, dtype: str) -> dict:
    if not recipe.eval.tasks:
        return {"seconds": 0.0, "models": [], "tasks": [], "peak_bytes": 0.0}
    tasks = task_workloads(recipe)
    models = eval_models(recipe, groups, st, dtype)
    per_model = {}
    for m in models:
        load = m["bytes"] / rates.disk * (3 if m["merge"] else 1)  # a merge: base + experts read, then reloaded
        write = m["bytes"] / rates.save if m["merge"] else 0.0
        per_model[m["name"]] = load + write + _model_seconds(m["decoder"], m["bytes"], tasks,
                                                             recipe.eval.batch_size, rates)
    seq = max((t["max_prompt"] + t["max_new_tokens"] for t in tasks), default=0)
    biggest = max(models, key=lambda m: m["bytes"]) if models else None
    peak = 0.0
    if biggest is not None:
        shape = st.shape
        peak = (biggest["bytes"] + M.kv_cache_bytes(shape, recipe.eval.batch_size, int(seq))
                + M.inference_bytes(shape, recipe.eval.batch_size, int(seq)) + M.OVERHEAD_GIB * M.GIB)
    return {"seconds": sum(per_model.values()), "per_model_s": per_model, "tasks": tasks, "peak_bytes": peak}
