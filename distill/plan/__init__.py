"""`distill plan`: what a recipe will cost on given hardware, before any GPU time is spent.

    plan = make_plan(recipe, "a6000", minutes=60)            # a dict; render(plan) is the table
    plan = make_plan(recipe, "cpu", 20, rates=measure(...))  # distill plan --measure

Modules: params (parameter counts from configs), gpus (the hardware table and MFU), workload
(tokens, padded as the stages pad), specs (the recipe's models), estimate (capture and train
seconds, memory), evaltime (evaluation), budget (the split, what fits, warnings), measure
(real capture batches and training steps on this machine), report (the table).
"""

from __future__ import annotations

from distill.config import Recipe
from distill.plan import memory as M
from distill.plan.budget import split, warnings
from distill.plan.estimate import Rates, assumed_rates, capture_estimate, train_estimate
from distill.plan.evaltime import eval_estimate
from distill.plan.gpus import get_hardware
from distill.plan.specs import GroupSpec, StudentSpec, student_spec, teacher_groups
from distill.plan.workload import cache_bytes, workload

FORMAT = "distill-plan-v1"


def _models(groups: list[GroupSpec], st: StudentSpec) -> dict:
    return {"teacher_groups": [{"model": g.model, "model_type": g.shape.model_type, "params": g.params.total,
                                "dtype": g.dtype, "quantization": g.quantization,
                                "weights_gib": M.gib(g.weight_bytes),
                                "teachers": [{"name": t.name, "adapter_params": t.adapter_params, "online": t.online}
                                             for t in g.teachers]} for g in groups],
            "student": {"model": st.model, "model_type": st.shape.model_type, "params": st.params.total,
                        "trainable": st.trainable, "lora": st.lora, "gradient_checkpointing": st.checkpointing}}


def _cache(recipe: Recipe, groups: list[GroupSpec], w) -> dict:
    from distill.cache.codec import make_codec

    vocab = groups[0].shape.vocab
    codec = make_codec(recipe.cache.codec, recipe.cache.top_k, vocab)  # the codec module's own record size
    cached = sum(1 for g in groups for t in g.teachers if not t.online)
    out = cache_bytes(w, cached, codec.record_bytes, vocab, recipe.cache.id_order == "teacher")
    return {**out, "codec": recipe.cache.codec, "top_k": recipe.cache.top_k, "cached_teachers": cached}


def make_plan(recipe: Recipe, gpu: str, minutes: float, gpus: int = 1, zero: int = 0,
              config_dir: str | None = None, rates: Rates | None = None) -> dict:
    hw = get_hardware(gpu)
    rates = rates or assumed_rates(hw)
    groups = teacher_groups(recipe, hw, config_dir)
    st = student_spec(recipe, hw, config_dir)
    w = workload(recipe, gpus)
    cache = _cache(recipe, groups, w)
    stages = {"capture": capture_estimate(recipe, groups, w, rates, gpus, cache),
              "train": train_estimate(recipe, st, groups, w, rates, gpus, zero),
              "eval": eval_estimate(recipe, groups, st, rates, hw.dtype)}
    budget = split(recipe, w, stages["capture"], stages["train"], stages["eval"], minutes)
    return {"format": FORMAT, "recipe": recipe.name, "hardware": {**hw.describe(), "gpus": gpus, "zero": zero},
            "rates": rates.describe(), "models": _models(groups, st), "data": w.describe(), "stages": stages,
            "budget": budget, "warnings": warnings(recipe, hw, stages, budget)}
