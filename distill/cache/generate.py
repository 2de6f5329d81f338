"""Teacher-generated responses for prompt-only sources, made once before capture and kept in the cache.

    <cache>/generated/meta.json               what the responses are generated from (their identity)
    <cache>/generated/<teacher>-00000.jsonl   one line per prompt: {"source", "row", "ids", "eos"}

Prompts are grouped by generating teacher (recipe order) and cut into chunks of
CHUNK_PROMPTS; a chunk is one file, written under a temporary name and renamed when
complete, so a rerun generates only the chunks that are missing. Under `accelerate
launch` chunk j goes to rank j % world: every rank writes exactly the files one
process would, then all ranks read all chunks. Within a chunk, prompts run in
length-sorted batches of cache.batch_size, left-padded, through `model.generate`
(KV cache) under `torch.inference_mode`; a LoRA teacher generates with its adapter
active on the group's shared base (distill/cache/teachers.py).

Greedy rows take the argmax. A sampled row draws from its own torch.Generator seeded
by (generate.seed, source, row), inside a logits processor that hands its choice to
greedy search as a one-hot score; so a response depends on neither its batch, nor the
batch size, nor the number of processes, and a resumed run regenerates a missing
chunk exactly. A response stops at the tokenizer's EOS or any EOS id of the teacher's
generation_config (the stop token is kept, and is a target), or after its token budget.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from distill.cache import manifest as mf
from distill.cache.manifest import teacher_record
from distill.cache.teachers import Active, GroupLoader, groups
from distill.config import Recipe
from distill.data import Generated, Prompt
from distill.errors import CacheError
from distill.files import sha256_file, write_json_atomic, write_text_atomic
from distill.progress import progress
from distill.schema import to_dict

FORMAT = "distill-generated"
VERSION = 1
CHUNK_PROMPTS = 256


def row_seed(p: Prompt) -> int:
    digest = hashlib.sha256(f"{p.gen.seed}:{p.source}:{p.row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities [V] restricted to the smallest set of tokens holding >= top_p of the mass."""
    probs = torch.softmax(logits.float(), -1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True, stable=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)  # the top-1 always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


class _RowSampler(LogitsProcessor):
    """Sampled rows: draw the next token from the row's own generator, return it as a one-hot score."""

    def __init__(self, prompts: list[Prompt]):
        self.rows = [(r, p.gen.temperature, p.gen.top_p, row_seed(p)) for r, p in enumerate(prompts)
                     if p.gen.do_sample]
        self.gens: dict[int, torch.Generator] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for r, temperature, top_p, seed in self.rows:
            if r not in self.gens:
                self.gens[r] = torch.Generator(device=scores.device).manual_seed(seed)
            choice = torch.multinomial(nucleus(scores[r] / temperature, top_p), 1, generator=self.gens[r])
            out[r] = float("-inf")
            out[r, choice] = 0.0
        return out


def stop_ids(tok, model) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return sorted(ids)


@torch.inference_mode()
def generate_batch(model, prompts: list[Prompt], pad_id: int, stop: list[int]) -> list[Generated]:
    """One left-padded batch; each row cut to its own budget and at its first stop token."""
    device = next(model.parameters()).device
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p.input_ids):] = torch.tensor(p.input_ids)
        attn[r, width - len(p.input_ids):] = 1
    # A fresh config with the processors spelled out: the model's own may sample or penalise repeats.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max(p.max_new_tokens for p in prompts),
                              min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
                              eos_token_id=stop or None, pad_token_id=pad_id)
    sampler = LogitsProcessorList([_RowSampler(prompts)]) if any(p.gen.do_sample for p in prompts) else None
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config,
                         logits_processor=sampler)
    results = []
    for r, p in enumerate(prompts):
        new = out[r, width:width + p.max_new_tokens].tolist()
        cut = next((j for j, t in enumerate(new) if t in stop), None)
        results.append(Generated(new if cut is None else new[:cut + 1], cut is not None))
    return results


def generate_prompts(model, prompts: list[Prompt], batch_size: int, pad_id: int, stop: list[int]) -> list[Generated]:
    """Responses in prompt order; batches by prompt length (stable), longest first."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i].input_ids), i))
    out: list[Generated | None] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        for i, g in zip(idx, generate_batch(model, [prompts[i] for i in idx], pad_id, stop)):
            out[i] = g
    return out


# ---------------------------------------------------------------- the files


def plan_chunks(prompts: list[Prompt], recipe: Recipe) -> list[tuple[str, str, list[int]]]:
    """(file name, teacher, prompt indices) per chunk, teachers in recipe order."""
    plan = []
    for t in recipe.teachers:
        idx = [i for i, p in enumerate(prompts) if p.teacher == t.name]
        for j in range(0, len(idx), CHUNK_PROMPTS):
            plan.append((f"{t.name}-{j // CHUNK_PROMPTS:05d}.jsonl", t.name, idx[j:j + CHUNK_PROMPTS]))
    return plan


def generation_meta(recipe: Recipe, prompts: list[Prompt], tok_fp: str) -> dict:
    """Everything the responses depend on; any change makes the stored ones unusable."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.source, p.row, p.teacher, p.max_new_tokens, p.input_ids]).encode() + b"\n")
    used = {p.teacher for p in prompts}
    return {"format": FORMAT, "version": VERSION, "tokenizer": tok_fp, "chunk_prompts": CHUNK_PROMPTS,
            "prompts": len(prompts), "fingerprint": h.hexdigest(),
            "teachers": [teacher_record(t) for t in recipe.teachers if t.name in used],
            "settings": {f"data.sources[{i}].generate": to_dict(s.generate)
                         for i, s in enumerate(recipe.data.sources) if s.generate is not None}}


def prepare_dir(cache_dir: Path, meta: dict, rebuild: bool) -> None:
    """Reuse responses generated from the same inputs; refuse (or with rebuild, discard) a cache made otherwise."""
    gdir = cache_dir / "generated"
    old, found = None, False
    if (cache_dir / mf.NAME).exists():
        try:
            found, old = True, mf.stored_generation_meta(cache_dir)
        except CacheError:  # a corrupt manifest: refused below, or discarded with rebuild
            if not rebuild:
                raise
            found, old = True, None
    elif (gdir / "meta.json").exists():
        found = True
        try:
            old = json.loads((gdir / "meta.json").read_text())
        except json.JSONDecodeError:
            old = None
    old = old if isinstance(old, dict) else None
    if found and old != meta:
        what = (f"different generated responses ({', '.join(k for k in meta if old.get(k) != meta[k])})"
                if old else "no generated responses")
        if not rebuild:
            raise CacheError(f"{cache_dir}: existing cache was made with {what}; set cache.rebuild=true to "
                             "discard it, or use another cache.dir")
        shutil.rmtree(cache_dir)
    gdir.mkdir(parents=True, exist_ok=True)
    for tmp in gdir.glob("*.tmp*"):
        tmp.unlink()  # leftovers of a killed run are never trusted
    if not (gdir / "meta.json").exists():
        write_json_atomic(gdir / "meta.json", meta)


def write_chunk(path: Path, prompts: list[Prompt], responses: list[Generated]) -> None:
    lines = [json.dumps({"source": p.source, "row": p.row, "ids": g.ids, "eos": g.eos}) + "\n"
             for p, g in zip(prompts, responses)]
    write_text_atomic(path, "".join(lines))


def read_chunk(path: Path, prompts: list[Prompt]) -> list[Generated]:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        ok = len(rows) == len(prompts) and all((r["source"], r["row"]) == (p.source, p.row)
                                               for r, p in zip(rows, prompts))
        out = [Generated([int(t) for t in r["ids"]], bool(r["eos"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CacheError(f"{path}: generated responses do not match the recipe's prompts (corrupt file); "
                         "delete it to regenerate, or set cache.rebuild=true")
    return out


# ---------------------------------------------------------------- the step


def run_generation(recipe: Recipe, prompts: list[Prompt], tok, tok_fp: str, loader: GroupLoader, report,
                   rank: int = 0, world: int = 1, barrier=lambda: None) -> tuple[list[Generated], dict]:
    """Generate (or reuse) every prompt's response. Returns (responses in prompt order, manifest record).

    Every rank calls this (it holds barriers). The loader keeps the last group loaded,
    so the capture that follows can start with that group without loading it again.
    """
    cache_dir = Path(recipe.cache.dir)
    meta = generation_meta(recipe, prompts, tok_fp)
    if rank == 0:
        prepare_dir(cache_dir, meta, recipe.cache.rebuild)
    barrier()
    gdir = cache_dir / "generated"
    plan = plan_chunks(prompts, recipe)
    mine = [c for j, c in enumerate(plan) if j % world == rank and not (gdir / c[0]).exists()]
    by_name = {t.name: t for t in recipe.teachers}
    t0 = time.perf_counter()
    total = sum(len(c[2]) for c in mine)
    bar = progress(total=total, desc="generate", unit="responses", disable=rank != 0 or total == 0)
    for group in groups(recipe.teachers):
        todo = [c for c in mine if c[1] in {t.name for t in group}]
        if not todo:
            continue
        model = loader.get(group)
        stop = stop_ids(tok, model)
        for fname, tname, idx in todo:
            chunk = [prompts[i] for i in idx]
            with Active(model, by_name[tname]) as m:
                responses = generate_prompts(m, chunk, recipe.cache.batch_size, tok.pad_token_id, stop)
            write_chunk(gdir / fname, chunk, responses)
            report.generated += len(chunk)
            bar.update(len(chunk))
        del model  # the loader keeps it (for the capture) until another group is asked for
    bar.close()
    report.generate_s += time.perf_counter() - t0
    barrier()
    out: list[Generated | None] = [None] * len(prompts)
    files = {}
    for fname, _, idx in plan:
        for i, g in zip(idx, read_chunk(gdir / fname, [prompts[i] for i in idx])):
            out[i] = g
        files[fname] = sha256_file(gdir / fname)
    record = {"meta": meta, "files": files, "responses": len(out),
              "hit_eos": sum(g.eos for g in out)}
    return out, record
