"""What a recipe asks the hardware to do: tokens to capture and train on, padded as the stages pad them.

Counted exactly when the data can be read here (local files, a local tokenizer, no prompt-only
sources): the data is tokenized by the library's own `load_samples`, capture's batches are its
own length-sorted ones per shard, and the training plan is the trainer's seeded one
(`distill.batches.epoch_plan`), so padding is what the stages will really compute on.
Otherwise it is assumed: every row `data.max_length` tokens (an upper bound), half of them
targets under `mask: response`, and the output says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from distill.config import Recipe, looks_local
from distill.errors import DistillError

ASSUMED_TARGET_FRACTION = 0.5  # response tokens / all tokens when the data cannot be tokenized here


@dataclass
class Workload:
    samples: int
    tokens: int  # real tokens of all samples
    targets: int  # distillation targets (teacher rows per teacher)
    shards: int
    capture_padded: int  # tokens the teachers compute on, padding included (capture's batches)
    capture_batches: int
    epoch_padded: int  # tokens the student computes on in one epoch of the trainer's plan (all ranks)
    epoch_targets: int  # targets in one epoch (the ragged tail batch is dropped)
    micro_per_epoch: int  # global micro-batches per epoch
    max_len: int
    source_rows: list[int] = field(default_factory=list)  # rows taken from each source
    counted: bool = True  # False: the assumption of the module docstring
    note: str = ""

    def describe(self) -> dict:
        return asdict(self)


def _countable(recipe: Recipe) -> bool:
    tok = recipe.tokenizer or recipe.student.model
    local_data = all(looks_local(s.path) and s.generate is None for s in recipe.data.sources)
    return looks_local(tok) and recipe.student.gguf_file is None and local_data


def _capture_padding(samples, shard_tokens: int, batch_size: int) -> tuple[int, int, int]:
    """(shards, padded tokens, batches) of capture's own plan: shards, then length-sorted batches."""
    from distill.cache.capture import _batches, plan_shards

    shards = plan_shards(samples, shard_tokens)
    padded = n_batches = 0
    for a, b in shards:
        part = samples[a:b]
        for idx in _batches(part, batch_size):
            padded += len(idx) * max(len(part[i].input_ids) for i in idx)
            n_batches += 1
    return len(shards), padded, n_batches


def _epoch_padding(recipe: Recipe, lengths: np.ndarray, targets: np.ndarray, world: int) -> tuple[int, int, int]:
    """(padded tokens, targets, global micro-batches) of the trainer's epoch-0 plan."""
    from distill.batches import epoch_plan

    t = recipe.train
    plan = epoch_plan(len(lengths), t.batch_size, world, recipe.seed, 0,
                      lengths if t.group_by_length else None, t.group_batches)
    if not plan.global_batches:
        raise DistillError(f"train.batch_size: {t.batch_size} x {world} processes is more than the "
                           f"{len(lengths)} calibration samples")
    idx = np.asarray(plan.global_batches)
    lens = lengths[idx].reshape(len(idx), world, -1)  # each rank pads to its own longest sample
    return int(lens.max(axis=-1).sum()) * t.batch_size, int(targets[idx].sum()), len(idx)


def counted_workload(recipe: Recipe, world: int) -> Workload:
    """Tokenize the recipe's data here and lay it out as capture and training will."""
    from distill.data import load_samples
    from distill.models import load_tokenizer

    tok = load_tokenizer(recipe.tokenizer or recipe.student.model, trust_remote_code=recipe.trust_remote_code)
    samples, stats = load_samples(tok, recipe.data, recipe.teachers)
    lengths = np.asarray([len(s.input_ids) for s in samples], np.int64)
    targets = np.asarray([sum(s.target_mask) for s in samples], np.int64)
    shards, cap_padded, cap_batches = _capture_padding(samples, recipe.cache.shard_tokens, recipe.cache.batch_size)
    ep_padded, ep_targets, micro = _epoch_padding(recipe, lengths, targets, world)
    return Workload(len(samples), int(lengths.sum()), int(targets.sum()), shards, cap_padded, cap_batches,
                    ep_padded, ep_targets, micro, int(lengths.max()), list(stats.rows.values()),
                    note=f"counted: {stats.summary()}")


def _rows_of(recipe: Recipe) -> list[int]:
    """Rows per source without tokenizing: num_samples, or a local file's row count."""
    from distill.data import read_rows

    rows = []
    for i, s in enumerate(recipe.data.sources):
        if s.num_samples is not None and not looks_local(s.path):
            rows.append(s.num_samples)  # a Hub dataset: trust num_samples (never fetched here)
        elif looks_local(s.path):
            rows.append(len(read_rows(s, f"data.sources[{i}]", recipe.data.seed + i)))
        else:
            raise DistillError(f"data.sources[{i}]: {s.path!r} is a Hub dataset whose size the planner cannot "
                               "read offline; set num_samples")
    return rows


def assumed_workload(recipe: Recipe, world: int) -> Workload:
    """Every row data.max_length tokens; targets: all but the first token (mask: all) or a half."""
    rows = _rows_of(recipe)
    n, L = sum(rows), recipe.data.max_length
    frac = (L - 1) / L if recipe.data.mask == "all" else ASSUMED_TARGET_FRACTION
    t = recipe.train
    micro = n // (t.batch_size * world)
    if micro == 0:
        raise DistillError(f"train.batch_size: {t.batch_size} x {world} processes is more than the {n} samples")
    kept = micro * t.batch_size * world
    shards = max(1, math.ceil(n * L / recipe.cache.shard_tokens))
    return Workload(n, n * L, int(n * L * frac), shards, n * L, math.ceil(n / recipe.cache.batch_size),
                    kept * L, int(kept * L * frac), micro, L, rows, counted=False,
                    note=f"ASSUMED: {n} rows x data.max_length {L} tokens (an upper bound), "
                         f"{frac:.0%} of them targets; the data or tokenizer is not readable here")


def workload(recipe: Recipe, world: int) -> Workload:
    return counted_workload(recipe, world) if _countable(recipe) else assumed_workload(recipe, world)


def cache_bytes(w: Workload, n_cached_teachers: int, record_bytes: int, vocab: int, id_order: bool) -> dict:
    """Bytes on disk of the cache capture writes (every .npy has a 128-byte header).

    Per shard: input_ids int32 and target_mask uint8 per token, sample and row offsets int64
    per sample + 1, domains int16 per sample, and one record of `record_bytes` per target and
    cached teacher; id_order.npy (int32 per vocabulary id) for vk codecs with an id order."""
    header = 128
    tokens = 5 * w.tokens + (8 * 2 * (w.samples + w.shards)) + 2 * w.samples + 5 * header * w.shards
    records = n_cached_teachers * (w.targets * record_bytes + header * w.shards)
    order = 4 * vocab + header if id_order else 0
    return {"tokens_bytes": tokens, "records_bytes": records, "id_order_bytes": order,
            "total_bytes": tokens + records + order, "record_bytes": record_bytes}
