"""`distill plan --measure`: a few real capture batches and training steps on this machine.

Everything runs through the stages' own code, on a subset of the recipe's data in a temporary
run directory: `distill.cache.capture.run_capture` (model loads, the id-order pass, teacher
forwards, top-k, codec, writes) over a few batches per teacher, then the trainer's own set-up
(`distill.train.setup_training`: the student, its merge init, accelerate), its loader and its one
step (`distill.step.TrainStep`) for a few optimizer steps, and its final save. Rates are the
planner's own FLOP counts of exactly those batches (estimate.forward_flops / train_step_flops,
padding included) divided by their measured seconds, so they carry over to the full data with
the same arithmetic. The first training step is a warm-up: its time above the others' mean is
charged to the set-up. Evaluation: the student's model scores one batch (eval.batch_size examples)
of each task through the evaluation's own code (`distill.evaluation.runner`); the ratio of those
seconds to the planner's formulas at the measured rates, per kind (choice passes, generation),
scales the full evaluation's estimate (`Rates.eval_scale`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from distill.config import Recipe, load_recipe
from distill.plan import memory as M
from distill.plan.estimate import Rates, assumed_rates, forward_flops, save_bytes, train_step_flops
from distill.plan.gpus import get_hardware
from distill.plan.specs import student_spec, teacher_groups
from distill.plan.workload import counted_workload

TIMED_STEPS = 7  # after one warm-up step


def _subset_overrides(recipe: Recipe, run_dir: Path, rows: list[int]) -> list[str]:
    """The recipe cut to a few capture batches and TIMED_STEPS + 1 optimizer steps, in `run_dir`."""
    t = recipe.train
    want = max(4 * recipe.cache.batch_size, (TIMED_STEPS + 1) * t.batch_size * t.grad_accum)
    total = sum(rows)
    share = min(1.0, want / max(total, 1))
    over = [f"run_dir={run_dir}", f"cache.dir={run_dir}/cache", "cache.rebuild=true", "wandb.enabled=false",
            f"train.max_steps={TIMED_STEPS + 1}", "train.budget_minutes=null", "train.save_every_steps=null",
            f"cache.id_order_rows={min(recipe.cache.id_order_rows, want)}",
            f"eval.limit={min(recipe.eval.limit or recipe.eval.batch_size, recipe.eval.batch_size)}"]
    for i, n in enumerate(rows):
        over.append(f"data.sources.{i}.num_samples={max(1, math.ceil(n * share))}")
    return over


def _measure_capture(sub: Recipe, groups, log) -> dict:
    from distill.cache.capture import run_capture

    t0 = time.perf_counter()
    report = run_capture(sub)
    wall = time.perf_counter() - t0
    w = counted_workload(sub, 1)
    mean_len = w.capture_padded / max(w.capture_batches * sub.cache.batch_size, 1)
    flops = sum(forward_flops(g, t.adapter_params, w.capture_padded, w.targets, mean_len)
                for g in groups for t in g.teachers if not t.online)
    id_order_s = report.extra.get("id_order_s", 0.0)
    setup = wall - report.forward_s - report.encode_s - report.write_s - id_order_s
    log(f"plan --measure: capture of {w.samples} samples ({w.capture_padded} padded tokens) x "
        f"{len(sub.teachers)} teachers: forward {report.forward_s:.1f}s, top-k+codec {report.encode_s:.1f}s, "
        f"id order {id_order_s:.1f}s, wall {wall:.1f}s")
    return {"samples": w.samples, "padded_tokens": w.capture_padded, "forward_s": report.forward_s,
            "encode_s": report.encode_s, "write_s": report.write_s, "id_order_s": id_order_s, "wall_s": wall,
            "setup_s": max(setup, 0.0), "forward_flops": flops / max(report.forward_s, 1e-9),
            "overhead": report.encode_s / max(report.forward_s, 1e-9)}


def _timed_steps(sub: Recipe, s, st) -> tuple[list[float], list[float]]:
    """(seconds, planner FLOPs) of each optimizer step, through the trainer's loader and step."""
    from distill.train import micro_batch_iter, step_norm

    ga = sub.train.grad_accum
    it = micro_batch_iter(sub, s, 0, lambda *a, **k: None)
    times, flops = [], []
    for step in range(TIMED_STEPS + 1):
        batches = [next(it) for _ in range(ga)]
        norm = step_norm(s, step * ga, ga)
        t0 = time.perf_counter()
        s.step_fn(batches, norm)
        times.append(time.perf_counter() - t0)
        tokens = sum(b["input_ids"].numel() for b in batches)
        mean_len = tokens / sum(b["input_ids"].shape[0] for b in batches)
        flops.append(train_step_flops(st, tokens, norm, mean_len))
    return times, flops


def _measure_train(sub: Recipe, st, log) -> dict:
    from distill.train import save_final, setup_training

    t0 = time.perf_counter()
    s = setup_training(sub, lambda *a, **k: None)
    setup = time.perf_counter() - t0
    times, flops = _timed_steps(sub, s, st)
    steady = sum(times[1:]) / len(times[1:])
    t0 = time.perf_counter()
    save_final(sub, s, len(times), len(times) * sub.train.grad_accum, 0)
    save_s = time.perf_counter() - t0
    s.acc.end_training()
    rate = sum(flops[1:]) / sum(times[1:])
    log(f"plan --measure: train set-up {setup:.1f}s, steps {', '.join(f'{x:.2f}' for x in times)} s, "
        f"final save {save_s:.1f}s")
    return {"setup_s": setup + max(0.0, times[0] - steady), "step_s": times, "train_flops": rate, "save_s": save_s,
            "device": str(s.acc.device)}


def _measure_eval(sub: Recipe, st, rates: Rates, dtype: str, log) -> dict | None:
    """Seconds of one batch of each eval task group, scored by the student's model through the evaluation's
    own code, against the planner's seconds for the same examples; None when the recipe has no tasks."""
    from distill.evaluation import build_examples, load_task
    from distill.evaluation.runner import load_entry, resolve_device, run_choice_tasks, run_task, shared_views
    from distill.model_entries import model_entry
    from distill.plan.evaltime import scale_kind, task_seconds, task_workloads

    if not sub.eval.tasks:
        return None
    specs = [load_task(name) for name in sub.eval.tasks]
    examples = {s.name: build_examples(s, sub.eval.limit) for s in specs}
    entry = model_entry("plan-measure", sub, sub.student.model, gguf_file=sub.student.gguf_file,
                        revision=sub.student.revision)
    t0 = time.perf_counter()
    model, tok = load_entry(entry, resolve_device())
    load_s = time.perf_counter() - t0
    measured, predicted = {}, {}
    for group, work in zip(shared_views(specs, examples), task_workloads(sub)):
        assert work["tasks"] == [s.name for s in group]  # both walk shared_views in the same order
        exs, protocols = examples[group[0].name], [s.protocol_under(sub.eval.protocol) for s in group]

        def score(batch):
            if group[0].kind == "multiple_choice":
                run_choice_tasks(model, tok, group, batch, protocols, sub.eval.batch_size)
            else:
                run_task(model, tok, group[0], batch, protocols[0], sub.eval.batch_size)
        score(exs[:2])  # warm-up, not timed: the first calls of a kind pay one-off costs (kernels, caches)
        t0 = time.perf_counter()
        score(exs)
        kind = scale_kind(work)
        measured[kind] = measured.get(kind, 0.0) + time.perf_counter() - t0
        predicted[kind] = predicted.get(kind, 0.0) + task_seconds(st.params.decoder, M.weight_bytes(st.params, dtype),
                                                                  work, sub.eval.batch_size, rates)
    del model
    scale = {k: measured[k] / max(predicted[k], 1e-9) for k in measured}
    log(f"plan --measure: eval of {sub.eval.limit} examples per task, model load {load_s:.1f}s, "
        + ", ".join(f"{k} {measured[k]:.1f}s (x{scale[k]:.2f} the FLOP model)" for k in measured))
    return {"examples_per_task": sub.eval.limit, "load_s": load_s, "seconds": measured, "scale": scale}


def measure(recipe_path: str, overrides: list[str], gpu: str, config_dir: str | None, log=print) -> tuple[Rates, dict]:
    """Measured rates for `make_plan` (and the raw figures, for the plan's "measured" entry)."""
    hw = get_hardware(gpu)
    recipe = load_recipe(recipe_path, overrides)
    full = counted_workload(recipe, 1)
    tmp = Path(tempfile.mkdtemp(prefix="distill-plan-"))
    try:
        sub = load_recipe(recipe_path, overrides + _subset_overrides(recipe, tmp / "run", full.source_rows))
        groups, st = teacher_groups(sub, hw, config_dir), student_spec(sub, hw, config_dir)
        cap = _measure_capture(sub, groups, log)
        tr = _measure_train(sub, st, log)
        assumed = assumed_rates(hw)
        rates = Rates(cap["forward_flops"], tr["train_flops"], assumed.bandwidth, assumed.disk,
                      save_bytes(st) / max(tr["save_s"] - 1.0, 0.1), source="measured", optimizer_in_train_rate=True,
                      capture_overhead=cap["overhead"], train_setup_s=tr["setup_s"], capture_setup_s=cap["setup_s"])
        ev = _measure_eval(sub, st, rates, hw.dtype, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ev is not None:
        rates.eval_scale = ev["scale"]
    summary = (f"capture forward {cap['forward_flops'] / 1e9:.1f} GFLOP/s over {cap['samples']} samples, "
               f"train {tr['train_flops'] / 1e9:.1f} GFLOP/s over {TIMED_STEPS} steps after a warm-up"
               + (", eval " + ", ".join(f"{k} x{v:.2f}" for k, v in ev["scale"].items()) + " the FLOP model"
                  if ev else "") + f", on {tr['device']}")
    return rates, {"summary": summary, "capture": cap, "train": tr, "eval": ev}
