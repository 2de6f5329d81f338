"""Seconds and bytes per stage, from FLOPs, bytes moved and the hardware's rates.

Counted (forward of one token through a model with P decoder parameters, a LoRA adapter of A
parameters, L layers, attention width q, context c tokens):
    forward   2 (P + A) + 4 L q c/2   per computed token (padding included: the GPU computes it),
              + 2 V h per target row (capture and the loss run the head on target rows only)
    train     full: 6 P per token (+ 2 P with gradient checkpointing: the recomputed forward)
                    + 6 V h per target + 3x the attention term
              LoRA: 4 P per token (forward + the activations' gradients; no gradient for the frozen
                    weights) + 6 A + 4 V h per target (frozen head) + 3x attention (+ 2 P checkpointing)
    optimizer AdamW reads p, g, m, v and writes p, m, v: 28 bytes per trainable weight at the
              memory bandwidth (divided by the GPUs under ZeRO >= 1); folded into a measured rate.
A stage's time is FLOPs / (rate x GPUs), at least the weight bytes / bandwidth per batch (a forward
reads every weight once), plus loading weights from disk and writing what the stage writes.
Not counted: tokenization, Hub downloads, Python start-up (a few seconds each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distill.config import Recipe
from distill.plan import memory as M
from distill.plan.gpus import DISK_GBS, SAVE_GBS, Hardware, mfu
from distill.plan.specs import GroupSpec, StudentSpec
from distill.plan.workload import Workload

CAPTURE_OVERHEAD = 0.05  # top-k + codec + write on top of the forward: the DESIGN.md bar, met (benchmarks.md)


@dataclass
class Rates:
    """Effective rates per device. `source` is "assumed" (peak x MFU) or "measured" (distill plan --measure)."""

    forward_flops: float  # FLOP/s of a teacher forward (capture, eval prefill)
    train_flops: float  # FLOP/s of a training step
    bandwidth: float  # bytes/s, device memory
    disk: float  # bytes/s reading weights
    save: float  # bytes/s writing checkpoints, the student, merges
    source: str = "assumed"
    optimizer_in_train_rate: bool = False  # measured: the step time already holds the AdamW update
    capture_overhead: float = CAPTURE_OVERHEAD
    train_setup_s: float | None = None  # measured: build the student (and its merge init) + accelerate
    capture_setup_s: float | None = None  # measured: tokenizer, data, manifest before the first forward
    # measured: evaluation seconds / the FLOP model's seconds at these rates, per kind ("choice" for
    # multiple-choice passes, "generate" for generation), on a batch of each task (distill.plan.measure)
    eval_scale: dict | None = None

    def describe(self) -> dict:
        return asdict(self)


def assumed_rates(hw: Hardware) -> Rates:
    peak = hw.tflops * 1e12
    return Rates(peak * mfu(hw, "forward"), peak * mfu(hw, "train"), hw.bandwidth_gbs * 1e9, DISK_GBS * 1e9,
                 SAVE_GBS * 1e9)


def forward_flops(g: GroupSpec, adapter: int, padded: int, targets: int, mean_len: float) -> float:
    s = g.shape
    return (2 * (g.params.decoder + adapter) * padded + 4 * s.layers * s.q_dim * (mean_len / 2) * padded
            + 2 * s.vocab * s.hidden * targets)


def _mean_len(w: Workload, batch: int) -> float:
    return w.capture_padded / max(w.capture_batches * batch, 1)


def capture_group(recipe: Recipe, g: GroupSpec, w: Workload, rates: Rates, gpus: int, first: bool) -> dict:
    """One base model's share of `distill cache`: its load, each cached teacher's pass, the id order."""
    mean_len = _mean_len(w, recipe.cache.batch_size)
    per_batch_floor = w.capture_batches * g.weight_bytes / rates.bandwidth  # every weight read per batch
    teachers = {}
    for t in g.teachers:
        if t.online:
            continue
        flops = forward_flops(g, t.adapter_params, w.capture_padded, w.targets, mean_len)
        teachers[t.name] = max(flops / (rates.forward_flops * gpus), per_batch_floor / gpus)
    id_order_s = 0.0
    if first and recipe.cache.id_order == "teacher":
        # one extra pass of the first teacher over cache.id_order_rows evenly strided samples
        share = min(recipe.cache.id_order_rows, w.samples) / max(w.samples, 1)
        first_t = g.teachers[0]
        id_order_s = share * forward_flops(g, first_t.adapter_params, w.capture_padded, w.targets,
                                           mean_len) / rates.forward_flops
    # measured: the loads are inside the capture's measured set-up time
    loads = (teachers or id_order_s) and rates.capture_setup_s is None
    load_s = g.weight_bytes / rates.disk if loads else 0.0
    forward_s = sum(teachers.values())
    return {"model": g.model, "quantization": g.quantization, "load_s": load_s, "teachers_forward_s": teachers, "forward_s": forward_s,
            "overhead_s": rates.capture_overhead * forward_s, "id_order_s": id_order_s}


def capture_estimate(recipe: Recipe, groups: list[GroupSpec], w: Workload, rates: Rates, gpus: int,
                     cache: dict) -> dict:
    ranks = min(gpus, w.shards)  # ranks split the shards: a cache of one shard runs on one GPU
    parts = [capture_group(recipe, g, w, rates, ranks, i == 0) for i, g in enumerate(groups)]
    write_s = cache["total_bytes"] / rates.save
    setup = rates.capture_setup_s or 0.0
    total = setup + write_s + sum(p["load_s"] + p["forward_s"] + p["overhead_s"] + p["id_order_s"] for p in parts)
    peak = max((g.weight_bytes + M.inference_bytes(g.shape, recipe.cache.batch_size, w.max_len)
                + sum(t.adapter_params for t in g.teachers) * M.DTYPE_BYTES[g.dtype]) for g in groups)
    return {"seconds": total, "forward_s": sum(p["forward_s"] for p in parts), "setup_s": setup,
            "write_s": write_s, "groups": parts, "cache": cache, "peak_bytes": peak + M.OVERHEAD_GIB * M.GIB}


def train_step_flops(st: StudentSpec, tokens: float, targets: float, mean_len: float) -> float:
    """FLOPs of one optimizer step over `tokens` padded tokens and `targets` target rows (all ranks)."""
    s, P = st.shape, st.params.decoder
    attn = 3 * 4 * s.layers * s.q_dim * (mean_len / 2) * tokens
    recompute = 2 * P * tokens if st.checkpointing else 0.0
    if st.lora:
        return 4 * P * tokens + 6 * st.trainable * tokens + 4 * s.vocab * s.hidden * targets + attn + recompute
    return 6 * P * tokens + 6 * s.vocab * s.hidden * targets + attn + recompute


def planned_steps(recipe: Recipe, w: Workload) -> int:
    """The trainer's own count (distill.train._setup): max_steps, else epochs x micro-batches / grad_accum."""
    t = recipe.train
    return t.max_steps or max(1, int(t.epochs * w.micro_per_epoch) // t.grad_accum)


def step_seconds(recipe: Recipe, st: StudentSpec, w: Workload, rates: Rates, gpus: int, zero: int,
                 live: list[GroupSpec]) -> tuple[float, float, float]:
    """(seconds per optimizer step, padded tokens per step, targets per step), all ranks together."""
    ga = recipe.train.grad_accum
    tokens = w.epoch_padded / w.micro_per_epoch * ga
    targets = w.epoch_targets / w.micro_per_epoch * ga
    mean_len = w.epoch_padded / max(w.micro_per_epoch * recipe.train.batch_size * gpus, 1)
    seconds = train_step_flops(st, tokens, targets, mean_len) / (rates.train_flops * gpus)
    for g in live:  # online teachers run their forward on every micro-batch
        for t in g.teachers:
            if t.online:
                seconds += forward_flops(g, t.adapter_params, tokens, targets, mean_len) / (rates.forward_flops * gpus)
    if not rates.optimizer_in_train_rate:
        seconds += 28 * st.trainable / rates.bandwidth / (gpus if zero >= 1 else 1)
    return seconds, tokens, targets


def save_bytes(st: StudentSpec) -> float:
    """What the trainer's final save writes: the checkpoint (weights + AdamW's two fp32 moments) and the
    student (for LoRA the merged full model); distill.train.save_guess_s counts the same."""
    weights = 4 * st.trainable + M.DTYPE_BYTES[st.frozen_dtype] * st.frozen
    return 2 * weights + 8 * st.trainable


def save_seconds(st: StudentSpec, rates: Rates) -> float:
    return 1.0 + save_bytes(st) / rates.save


def train_memory(recipe: Recipe, st: StudentSpec, w: Workload, gpus: int, zero: int, live: list[GroupSpec]) -> dict:
    t = recipe.train
    opt = M.optimizer_bytes(st.trainable, st.frozen, zero, gpus, t.pure_bf16, M.DTYPE_BYTES[st.frozen_dtype])
    tokens = t.batch_size * w.max_len  # a micro-batch of the longest samples
    acts = M.train_activation_bytes(st.shape, tokens, st.checkpointing, recipe.loss.chunk_size, st.act_bytes)
    teachers = sum(g.weight_bytes for g in live if any(x.online for x in g.teachers))
    parts = {**opt, "activations": acts, "online_teachers": teachers, "overhead": M.OVERHEAD_GIB * M.GIB}
    return {"parts_gib": {k: M.gib(v) for k, v in parts.items()}, "peak_bytes": sum(parts.values())}


def train_estimate(recipe: Recipe, st: StudentSpec, groups: list[GroupSpec], w: Workload, rates: Rates,
                   gpus: int, zero: int) -> dict:
    step_s, tokens, targets = step_seconds(recipe, st, w, rates, gpus, zero, groups)
    steps = planned_steps(recipe, w)
    load_bytes = 4 * st.trainable + M.DTYPE_BYTES[st.frozen_dtype] * st.frozen
    setup = rates.train_setup_s if rates.train_setup_s is not None else load_bytes / rates.disk
    save = save_seconds(st, rates)
    mem = train_memory(recipe, st, w, gpus, zero, groups)
    return {"seconds": setup + steps * step_s + save, "setup_s": setup, "step_s": step_s, "steps": steps,
            "steps_per_epoch": max(1, w.micro_per_epoch // recipe.train.grad_accum),
            "tokens_per_step": tokens, "targets_per_step": targets, "tokens_per_s": tokens / step_s,
            "save_s": save, "memory": mem["parts_gib"], "peak_bytes": mem["peak_bytes"],
            "zero": zero, "gpus": gpus}
