"""How the minutes split between stages, how much calibration data fits, and what does not fit.

Each stage's time is split into a fixed part (loads, set-up, saves, the id-order pass, the whole
evaluation) and a part proportional to the calibration data (teacher forwards, writing records,
training steps). The data that fits is the share s of the recipe's data with
    fixed + s x proportional = minutes x 60,
and the plan proposes it as recipe overrides (`distill run RECIPE --plan PLAN.json` applies them):
each source's num_samples scaled by s (when s < 1), train.max_steps, and train.budget_minutes /
train.eval_reserve_minutes so the trainer's own wall-clock stop backs the estimate up
(train.budget_minutes counts from the end of the cache stage, see README "Wall-clock budget").
"""

from __future__ import annotations

import math

from distill.config import Recipe
from distill.plan.memory import GIB
from distill.plan.workload import Workload


def _parts(cap: dict, train: dict, ev: dict) -> tuple[float, float, float, float]:
    """(capture fixed, capture proportional, train fixed, train proportional) in seconds."""
    cap_var = sum(g["forward_s"] + g["overhead_s"] for g in cap["groups"]) + cap["write_s"]
    cap_fixed = cap["seconds"] - cap_var
    train_var = train["steps"] * train["step_s"]
    return cap_fixed, cap_var, train["seconds"] - train_var, train_var


def _overrides(recipe: Recipe, w: Workload, share: float, steps: int, train_s: float, eval_s: float) -> list[str]:
    out = []
    if share < 1:
        floor = recipe.train.batch_size  # at least one micro-batch of each source's rows
        for i, rows in enumerate(w.source_rows):
            out.append(f"data.sources.{i}.num_samples={max(floor, int(rows * share))}")
    out.append(f"train.max_steps={steps}")
    out.append(f"train.budget_minutes={math.ceil((train_s + eval_s) / 6) / 10}")
    out.append(f"train.eval_reserve_minutes={math.ceil(eval_s / 6) / 10}")
    return out


def split(recipe: Recipe, w: Workload, cap: dict, train: dict, ev: dict, minutes: float) -> dict:
    total = minutes * 60
    cap_fixed, cap_var, train_fixed, train_var = _parts(cap, train, ev)
    fixed = cap_fixed + train_fixed + ev["seconds"]
    var = cap_var + train_var
    needed = fixed + var
    share = (total - fixed) / var if var > 0 else 1.0
    use = max(0.0, min(1.0, share))
    steps = max(1, int(train["steps"] * use)) if use > 0 else 0
    cap_s, train_s = cap_fixed + cap_var * use, train_fixed + train["step_s"] * steps
    return {"minutes": minutes, "recipe_needs_minutes": needed / 60, "data_share_that_fits": share,
            "split_minutes": {"capture": cap_s / 60, "train": train_s / 60, "eval": ev["seconds"] / 60,
                              "spare": (total - cap_s - train_s - ev["seconds"]) / 60},
            "calibration": {"recipe_tokens": w.tokens, "recipe_targets": w.targets, "recipe_samples": w.samples,
                            "tokens_that_fit": int(w.tokens * max(share, 0.0)),
                            "proposed_tokens": int(w.tokens * use), "proposed_samples": int(w.samples * use)},
            "proposed_steps": steps,
            "overrides": _overrides(recipe, w, use, steps, train_s, ev["seconds"]) if steps else []}


def warnings(recipe: Recipe, hw, stages: dict, budget: dict) -> list[str]:
    """One line per problem, each starting with the stage it is in."""
    out = []
    limit = hw.memory_gib * GIB
    hints = {"capture": "quantization: 8bit or 4bit for the teachers, or a device with more memory",
             "train": ("student.gradient_checkpointing: true, " if not recipe.student.gradient_checkpointing else "")
             + "a LoRA student (student.lora), a smaller train.batch_size, or ZeRO-3 over more GPUs",
             "eval": "a smaller eval.batch_size"}
    for name in ("capture", "train", "eval"):
        peak = stages[name]["peak_bytes"]
        if peak > limit:
            out.append(f"{name}: does not fit in memory: peak {peak / GIB:.1f} GiB > {hw.memory_gib:g} GiB per "
                       f"{hw.name}; try {hints[name]}")
    quantized = sorted({g["quantization"] for g in stages["capture"]["groups"] if g["quantization"] != "none"})
    if quantized:
        out.append(f"capture: {'/'.join(quantized)} teachers run bitsandbytes kernels, usually slower than bf16; "
                   "the estimate assumes bf16 speed (measure with --measure on the GPU)")
    share, need = budget["data_share_that_fits"], budget["recipe_needs_minutes"]
    if share <= 0:
        fixed = budget["split_minutes"]
        out.append(f"time: does not fit: the fixed costs alone (model loads, train set-up and save, eval "
                   f"{fixed['eval']:.1f} min) exceed {budget['minutes']:g} min; evaluate fewer models or examples "
                   "(eval.limit, eval.teachers: false)")
    elif share < 1:
        out.append(f"time: capture + train + eval of the recipe's data need {need:.1f} min > {budget['minutes']:g} "
                   f"min; {share:.0%} of the calibration data fits (the overrides scale num_samples)")
    if 0 < share and budget["proposed_steps"] < 1:
        out.append("train: no optimizer step fits in the time left")
    return out
