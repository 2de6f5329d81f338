"""`distill cache`: run every teacher once over the calibration data and store its top-k.

    distill cache recipe.yaml                       # one process
    accelerate launch -m distill cache recipe.yaml  # data-parallel: ranks split the shards

Order of work, chosen so each teacher's weights are loaded once: teachers are
grouped by base model (a LoRA expert shares its base with its siblings: the base
is loaded once and adapters are switched, never merged); for each group, every
pending shard is run in length-sorted batches and each teacher's rows are written.
Tokenizers are compared before any weights load, so a mismatched teacher fails fast.

vk codecs code ids as ranks in the first teacher's own order (`cache.id_order: teacher`): before
the first shard, the main process runs the first group's first teacher over an evenly strided
subset of the samples (`cache.id_order_rows`), counts how often each id is in its top-128 and
writes the ids sorted by that count as `<cache>/id_order.npy` (hash in the manifest). That group
stays loaded and is captured first, so this costs no model load (except when generation left
another group loaded: always the first teacher, so the order does not depend on what a resumed
run happened to load); a resumed capture reuses the file.

Prompt-only sources (`generate:`) get their responses first (distill/cache/generate.py),
stored under `<cache>/generated/`; the group that generated last stays loaded and is
captured first, so a recipe whose experts share one base loads it once in all.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.cache import manifest as mf
from distill.cache.codec import sparse_from_logits
from distill.cache.codec_vk import ID_ORDER_FILE, id_order_from_topk, order_from_counts
from distill.cache.generate import run_generation
from distill.cache.teachers import Active, GroupLoader, groups
from distill.config import Recipe
from distill.data import Sample, load_samples
from distill.errors import CacheError, DistillError, out_of_memory
from distill.progress import progress
from distill.files import write_npy_atomic
from distill.logits import decoder, logit_transform, model_logits
from distill.models import config_vocab_size, load_tokenizer, tokenizer_fingerprint


@dataclass
class CaptureReport:
    cache_dir: str
    shards_done: int = 0
    shards_skipped: int = 0
    model_loads: int = 0  # full-model loads in this process (LoRA siblings share one)
    rows: int = 0
    generated: int = 0  # responses generated in this process (prompt-only sources; 0 when reused)
    generate_s: float = 0.0
    forward_s: float = 0.0  # teacher forward passes (incl. LM head on target rows)
    encode_s: float = 0.0  # top-k + codec
    write_s: float = 0.0  # files + hashes + manifest
    data_summary: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- planning


def plan_shards(samples: list[Sample], shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) sample ranges of about `shard_tokens` tokens each."""
    plan, start, n = [], 0, 0
    for i, s in enumerate(samples):
        n += len(s.input_ids)
        if n >= shard_tokens:
            plan.append((start, i + 1))
            start, n = i + 1, 0
    if start < len(samples):
        plan.append((start, len(samples)))
    return plan


def check_tokenizers(recipe: Recipe):
    """Load the reference tokenizer and refuse any teacher whose tokenizer differs."""
    ref = recipe.tokenizer or recipe.student.model
    tok = load_tokenizer(ref, gguf_file=None if recipe.tokenizer else recipe.student.gguf_file,
                         trust_remote_code=recipe.trust_remote_code, what="tokenizer")
    fp = tokenizer_fingerprint(tok)
    for i, t in enumerate(recipe.teachers):
        src = t.adapter if t.adapter and Path(t.adapter, "tokenizer_config.json").exists() else t.model
        ttok = load_tokenizer(src, revision=t.revision, gguf_file=t.gguf_file if src == t.model else None,
                              trust_remote_code=recipe.trust_remote_code, what=f"teachers[{i}].model")
        if tokenizer_fingerprint(ttok) != fp:
            raise DistillError(f"teachers[{i}] ({t.name}): its tokenizer differs from the student's ({ref}); "
                               "all teachers and the student must share one tokenizer")
    return tok, fp


def vocab_size_of(recipe: Recipe) -> int:
    """The teachers' shared vocabulary size (their configs, read before any weights load)."""
    sizes = {config_vocab_size(t.model, revision=t.revision, gguf_file=t.gguf_file,
                               trust_remote_code=recipe.trust_remote_code, what=f"teachers[{i}].model")
             for i, t in enumerate(recipe.teachers)}
    if len(sizes) != 1:
        raise DistillError(f"teachers: vocabulary sizes differ ({sorted(sizes)}); teachers must share one vocabulary")
    return sizes.pop()


# ---------------------------------------------------------------- teacher forward


@torch.inference_mode()
def teacher_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                 k: int, row_chunk: int = 2048, clock: dict | None = None):
    """Top-k next-token distributions at the selected positions.

    input_ids, attention_mask: [B, T]; select: [B, T-1] bool, True where position t's
    prediction (of token t+1) is a target. Returns ids [M, k], logprobs [M, k], log_residual [M]
    in row-major (sample, position) order. The LM head runs only on selected rows, followed by
    the model's own logit transform (distill/logits.py: Gemma 2's softcap, Cohere's scale...).
    clock: if given, seconds are added to clock["forward"] (decoder + LM head) and
    clock["topk"] (the top-k and tail mass), synchronising CUDA around each part.
    """
    sync = torch.cuda.synchronize if input_ids.is_cuda and clock is not None else (lambda: None)
    clock = {} if clock is None else clock
    transform = logit_transform(model)
    tick = time.perf_counter()
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = hidden[:, :-1][select]
    parts = []
    for i in range(0, len(h), row_chunk):
        logits = model_logits(model, h[i:i + row_chunk], transform)
        sync()
        mid = time.perf_counter()
        parts.append(sparse_from_logits(logits, k))
        sync()
        clock["forward"] = clock.get("forward", 0.0) + mid - tick
        tick = time.perf_counter()
        clock["topk"] = clock.get("topk", 0.0) + tick - mid
    if not parts:
        return sparse_from_logits(model_logits(model, h, transform), k)
    return tuple(torch.cat(p) for p in zip(*parts))


def _batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Length-sorted batches (stable), to cut padding; deterministic."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(samples: list[Sample], idx: list[int], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    T = max(len(samples[i].input_ids) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(idx), T), dtype=torch.long)
    tgt = torch.zeros((len(idx), T), dtype=torch.bool)
    for r, i in enumerate(idx):
        n = len(samples[i].input_ids)
        ids[r, :n] = torch.tensor(samples[i].input_ids)
        attn[r, :n] = 1
        tgt[r, :n] = torch.tensor(samples[i].target_mask)
    return ids.to(device), attn.to(device), tgt[:, 1:].to(device)


class NonFiniteTeacher(DistillError):
    """A teacher's log-probabilities hold NaN or +inf (an overflowing fp16 model, a broken checkpoint)."""


def _check_finite(top_lp: torch.Tensor, res: torch.Tensor, select: torch.Tensor, idx: list[int], first: int) -> None:
    """Refuse NaN or +inf in a batch's top-k log-probabilities or residuals, naming the first sample
    (its index in the calibration data) and token position. -inf is a legitimate log-probability
    (a masked token, or an empty residual when top_k covers the vocabulary)."""
    bad = torch.isnan(top_lp).any(-1) | torch.isposinf(top_lp).any(-1) | torch.isnan(res) | torch.isposinf(res)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])  # rows are the selected positions, batch row by batch row
    counts = select.sum(dim=1).cumsum(0)
    r = int((counts <= row).sum())
    pos = int(select[r].nonzero()[row - (int(counts[r - 1]) if r else 0), 0]) + 1
    raise NonFiniteTeacher(f"non-finite logits (NaN or inf) at sample {first + idx[r]} of the calibration data, "
                           f"token {pos}")


def shard_rows(model, samples: list[Sample], codec, batch_size: int, pad_id: int, device,
               report: CaptureReport, first: int = 0) -> np.ndarray:
    """Encoded rows of one teacher for one shard's samples (the data's samples first, first + 1, ...), in
    sample order. A NaN or +inf in the teacher's distributions raises NonFiniteTeacher."""
    per_sample: list[np.ndarray | None] = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        ids, attn, select = _pad(samples, idx, pad_id, device)
        clock: dict[str, float] = {}
        try:
            top_ids, top_lp, res = teacher_topk(model, ids, attn, select, codec.k, clock=clock)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            raise DistillError(f"out of memory running a teacher on {len(idx)} samples of up to {ids.shape[1]} "
                               f"tokens: lower cache.batch_size ({batch_size}) or data.max_length") from None
        _check_finite(top_lp, res, select, idx, first)
        t1 = time.perf_counter()
        records = codec.encode(top_ids, top_lp, res).cpu().numpy()
        # The top-k counts as capture overhead, not as the teacher's forward (DESIGN.md section 6).
        report.encode_s += clock.get("topk", 0.0) + time.perf_counter() - t1
        report.forward_s += clock.get("forward", 0.0)
        counts = select.sum(dim=1).tolist()
        start = 0
        for r, i in enumerate(idx):
            per_sample[i] = records[start:start + counts[r]]
            start += counts[r]
    return np.concatenate(per_sample) if per_sample else np.zeros((0, codec.record_bytes), np.uint8)


def id_order_samples(samples: list[Sample], n: int) -> list[int]:
    """Up to n sample indices, evenly strided over the data (deterministic)."""
    n = min(n, len(samples))
    return [i * len(samples) // n for i in range(n)]


def ensure_id_order(recipe: Recipe, cache_dir: Path, samples: list[Sample], loader: GroupLoader, pad_id: int,
                    vocab_size: int, device, report: CaptureReport) -> None:
    """Main process: compute and record the cache's id order unless the manifest already has one.

    The first group's first teacher (its adapter active) over the calibration samples' target
    rows: each id's count is the rows whose top-128 hold it; ids by (-count, id). A resumed
    capture keeps the recorded file (codec_from_manifest checks its hash), never recomputes it."""
    order = mf.read_manifest(cache_dir)["codec"]["id_order"]  # the settings the order is made with
    if "sha256" in order:
        return
    t0 = time.perf_counter()
    group = groups(recipe.teachers)[0]
    model = loader.get(group)
    cal = [samples[i] for i in id_order_samples(samples, recipe.cache.id_order_rows)]
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    with Active(model, group[0]) as m:
        for idx in _batches(cal, recipe.cache.batch_size):
            ids, attn, select = _pad(cal, idx, pad_id, device)
            top_ids, _, _ = teacher_topk(m, ids, attn, select, min(order["top"], vocab_size))
            counts = id_order_from_topk(top_ids, vocab_size, counts)
    mf.record_id_order(cache_dir, write_npy_atomic(cache_dir / ID_ORDER_FILE, order_from_counts(counts)))
    report.extra["id_order_s"] = time.perf_counter() - t0


def write_tokens(shard_dir: Path, samples: list[Sample], domains: list[str]) -> dict[str, dict]:
    lengths = [len(s.input_ids) for s in samples]
    rows = [sum(s.target_mask) for s in samples]
    arrays = {
        "input_ids.npy": np.concatenate([np.asarray(s.input_ids, np.int32) for s in samples]),
        "target_mask.npy": np.concatenate([np.asarray(s.target_mask, np.uint8) for s in samples]),
        "sample_offsets.npy": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "row_offsets.npy": np.concatenate([[0], np.cumsum(rows)]).astype(np.int64),
        "domains.npy": np.asarray([domains.index(s.domain) if s.domain else -1 for s in samples], np.int16),
    }
    return {name: write_npy_atomic(shard_dir / name, arr) for name, arr in arrays.items()}


# ---------------------------------------------------------------- the stage


def run_capture(recipe: Recipe, state=None) -> CaptureReport:
    """Capture (or resume) the recipe's cache. `state` is an accelerate PartialState (or None)."""
    rank = state.process_index if state is not None else 0
    world = state.num_processes if state is not None else 1
    device = state.device if state is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    main = rank == 0
    barrier = state.wait_for_everyone if state is not None else (lambda: None)

    tok, tok_fp = check_tokenizers(recipe)  # refusals that need no cache directory come first
    vocab_size = vocab_size_of(recipe)
    with mf.capture_lock(recipe.cache.dir) if main else contextlib.nullcontext():
        return _capture(recipe, rank, world, device, main, barrier, tok, tok_fp, vocab_size)


_NPY_HEADER = 128  # bytes of a .npy header: numpy pads it to a multiple of 64


def bytes_to_write(manifest: dict) -> int:
    """Bytes of the cache files `manifest` does not list yet (their sizes follow from the shard plan
    and the codec's fixed record size), headers included."""
    rb = manifest["codec"]["record_bytes"]
    need = 0
    for e in manifest["shards"].values():
        n = e["samples"][1] - e["samples"][0]
        sizes = {"input_ids.npy": 4 * e["tokens"], "target_mask.npy": e["tokens"], "sample_offsets.npy": 8 * (n + 1),
                 "row_offsets.npy": 8 * (n + 1), "domains.npy": 2 * n}
        sizes |= {mf.teacher_file(t): rb * e["rows"] for t in mf.cached_teachers(manifest)}
        need += sum(_NPY_HEADER + b for f, b in sizes.items() if f not in e["files"])
    order = manifest["codec"].get("id_order")
    if order is not None and "sha256" not in order:
        need += _NPY_HEADER + 4 * manifest["codec"]["vocab_size"]
    return need


def check_free_space(cache_dir: Path, manifest: dict) -> None:
    """Refuse, before any teacher runs, a capture whose files cannot fit on the cache's disk."""
    need, free = bytes_to_write(manifest), shutil.disk_usage(cache_dir).free
    if need > free:
        raise CacheError(f"{cache_dir}: the cache needs {need / 2**20:.1f} MiB more and its disk has "
                         f"{free / 2**20:.1f} MiB free; free space or set cache.dir on a larger disk (no shard "
                         "was written; rerun to resume)")


def _capture(recipe: Recipe, rank: int, world: int, device, main: bool, barrier, tok, tok_fp: str,
             vocab_size: int) -> CaptureReport:
    cache_dir = Path(recipe.cache.dir)
    report = CaptureReport(cache_dir=str(cache_dir))
    loader = GroupLoader(recipe, device)
    generation: dict = {}

    def answer(prompts):  # called by load_samples only when a source is prompt-only
        responses, generation["record"] = run_generation(recipe, prompts, tok, tok_fp, loader, report,
                                                         rank, world, barrier)
        return responses

    samples, stats = load_samples(tok, recipe.data, recipe.teachers, answer)
    domains = sorted({s.domain for s in samples if s.domain})
    plan = plan_shards(samples, recipe.cache.shard_tokens)
    fresh = mf.new_manifest(recipe, tok_fp, samples, domains, plan, vocab_size, stats.summary(),
                         generation.get("record"))
    report.data_summary = stats.summary()
    if main:
        check_free_space(cache_dir, mf.open_or_create(cache_dir, fresh, recipe.cache.rebuild))
    barrier()
    if main and recipe.cache.id_order == "teacher":
        ensure_id_order(recipe, cache_dir, samples, loader, tok.pad_token_id, vocab_size, device, report)
    barrier()  # the other ranks read the order the main process wrote
    manifest = mf.read_manifest(cache_dir)
    codec = mf.codec_from_manifest(manifest, cache_dir)
    mine = [name for i, name in enumerate(sorted(manifest["shards"])) if i % world == rank]

    # Tokens first: they are cheap and let a reader see the data even mid-capture.
    for name in mine:
        entry = manifest["shards"][name]
        shard_dir = cache_dir / name
        shard_dir.mkdir(exist_ok=True)
        for tmp in shard_dir.glob("*.tmp*"):
            tmp.unlink()  # leftovers of a killed run are never trusted
        if not all(f in entry["files"] for f in mf.TOKEN_FILES):
            a, b = entry["samples"]
            for fname, rec in write_tokens(shard_dir, samples[a:b], domains).items():
                mf.record_file(cache_dir, name, fname, rec)

    manifest = mf.read_manifest(cache_dir)
    cached = [t for t in recipe.teachers if not t.online]  # online teachers run in `distill train` instead
    pending = {t.name: [s for s in mine if mf.teacher_file(t.name) not in manifest["shards"][s]["files"]]
               for t in cached}
    report.shards_skipped = sum(1 for s in mine if mf.is_shard_complete(manifest, s))
    total = sum(len(v) for v in pending.values())
    bar = progress(total=total, desc="cache", unit="shard·teacher", disable=not main or total == 0)
    for group in sorted(groups(cached), key=lambda g: not loader.holds(g)):  # a loaded group first
        if not any(pending[t.name] for t in group):
            continue
        model = loader.get(group)
        for name in sorted({s for t in group for s in pending[t.name]}):
            a, b = manifest["shards"][name]["samples"]
            for t in group:
                if name not in pending[t.name]:
                    continue
                with Active(model, t) as m:
                    try:
                        rows = shard_rows(m, samples[a:b], codec, recipe.cache.batch_size, tok.pad_token_id,
                                          device, report, first=a)
                    except NonFiniteTeacher as exc:
                        raise NonFiniteTeacher(f"teacher {t.name}: {exc}; nothing of it was written for "
                                               f"{name}") from None
                t0 = time.perf_counter()
                rec = write_npy_atomic(cache_dir / name / mf.teacher_file(t.name), rows)
                mf.record_file(cache_dir, name, mf.teacher_file(t.name), rec)
                report.write_s += time.perf_counter() - t0
                report.rows += len(rows)
                bar.update(1)
            report.shards_done += 1
        del model  # so that loading the next group frees this one first
    loader.release()
    report.model_loads = loader.loads
    bar.close()
    barrier()
    final = mf.read_manifest(cache_dir)
    if not final["complete"]:
        raise CacheError(f"{cache_dir}: capture ended with incomplete shards (a rank failed?)")
    return report
