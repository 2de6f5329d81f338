"""Loader overhead: the training step fed from the on-disk cache through the real DataLoader, against
the same step fed from batches already in memory (pre-collated tensors).

    python bench/loader_bench.py --quick                  # 2 rounds x 4 steps, up to 256 tokens, the trainer's variants
    python bench/loader_bench.py                          # 5 rounds x 10 steps, workers 0 and 2, decode main/workers
    python bench/loader_bench.py --workers 0 2 4 --decode main workers --batch-size 8 --steps 20

Setup: a synthetic cache in a temporary folder (samples of 64..1024 tokens, the second half
targets, 2 teachers, the default codec at k = 26 over V = 49,152 -- records encoded from the top-k
of random logits, so decoding does the real work), and a random-init Llama student (4 layers, hidden 256,
vocab 49,152, fp32, no mixed precision). One step is the library's `distill.step.TrainStep`
(decode, routing weights, student forward + chunked loss, backward, finiteness check, clipping,
AdamW), exactly as the trainer runs it, with grad_accum 1 and length grouping on.

Variants: "loader" reads the micro-batches through `distill.batches.make_loader` with the
given workers, decoding teacher records in the main process ("main", the CUDA path: records
stay compact until they reach the device) or in the workers ("workers"). "memory" feeds the
same micro-batches, in the same format, from a list collated beforehand: it is what the step
costs when reading costs nothing.

Noise: the two run in lockstep, a loader step then a memory step on the same micro-batch
(same shapes), alternating which goes first, so a change in the load of a shared machine
hits both alike; every round runs every variant once, in a rotating order. The first pair
of a run is untimed (worker start-up, paid once per training run). Overhead is reported as
total loader time / total memory time - 1 and as the median of the per-pair ratios - 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill import batches as B  # noqa: E402
from distill.files import write_npy_atomic  # noqa: E402
from distill.cache import store  # noqa: E402
from distill.cache import manifest as mf  # noqa: E402
from distill.cache.codec import make_codec, sparse_from_logits  # noqa: E402
from distill.config import LossConfig  # noqa: E402
from torch.utils.data._utils.pin_memory import pin_memory  # noqa: E402

VOCAB = 49_152
TEACHERS = ("t0", "t1")


def build_cache(folder: Path, n_samples: int, min_len: int, max_len: int, codec, seed: int = 0) -> Path:
    """A complete cache with random tokens and valid codec records (a pool of encoded rows, reused)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    rows = np.concatenate([codec.encode(*sparse_from_logits(3 * torch.randn(256, VOCAB, generator=g), codec.k)).numpy()
                           for _ in range(8)])
    pool = len(rows)

    lengths = rng.integers(min_len, max_len + 1, size=n_samples)
    shards, per_shard = {}, 256
    for s, a in enumerate(range(0, n_samples, per_shard)):
        lens = lengths[a:a + per_shard]
        name = mf.shard_name(s)
        d = folder / name
        d.mkdir(parents=True)
        tok = np.concatenate([rng.integers(3, VOCAB, size=n) for n in lens]).astype(np.int32)
        mask = np.concatenate([(np.arange(n) >= n // 2) for n in lens]).astype(np.uint8)
        n_rows = int(mask.sum())
        row_off = np.concatenate([[0], np.cumsum([n - n // 2 for n in lens])]).astype(np.int64)
        files = {"input_ids.npy": tok, "target_mask.npy": mask,
                 "sample_offsets.npy": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                 "row_offsets.npy": row_off, "domains.npy": np.arange(len(lens), dtype=np.int16) % 2}
        for t in TEACHERS:
            files[mf.teacher_file(t)] = rows[rng.integers(0, pool, size=n_rows)]
        shards[name] = {"samples": [a, a + len(lens)], "files": {}}
        for fname, arr in files.items():
            shards[name]["files"][fname] = write_npy_atomic(d / fname, arr)
    targets = int(sum(n - n // 2 for n in lengths))
    manifest = {"format": mf.FORMAT, "version": mf.VERSION, "codec": codec.describe(),
                "teachers": [{"name": t} for t in TEACHERS], "domains": ["d0", "d1"], "shards": shards,
                "data": {"samples": int(n_samples), "targets": targets}, "complete": True}
    mf.write_manifest(folder, manifest)  # with its checksum, as capture writes it
    return folder


def build_step(hidden: int, layers: int, codec, lr: float = 1e-4):
    """The trainer's micro-step + optimizer step on a random-init student, behind an Accelerator."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import TeacherConfig
    from distill.signals import CachedTeachers, Teachers
    from distill.step import StudentWithLoss, TrainStep

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, tie_word_embeddings=True)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    wrapped = StudentWithLoss(LlamaForCausalLM(cfg), LossConfig())
    opt = torch.optim.AdamW(wrapped.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    wrapped, opt = acc.prepare(wrapped, opt)
    teachers = [TeacherConfig(name=t, model="-", domains=[f"d{i}"]) for i, t in enumerate(TEACHERS)]
    train_step = TrainStep(acc, wrapped, opt, sched,
                           Teachers([CachedTeachers(codec, TEACHERS)], teachers, ["d0", "d1"], "fixed"),
                           max_grad_norm=1.0)

    def step(batch: dict, norm: int) -> None:
        train_step([batch], norm)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def run_pairs(step, loader, memory: list[dict], norms: list[int]) -> tuple[list[float], list[float]]:
    """Step through the loader and the in-memory list in lockstep, alternating which goes first,
    so each loader step is paired with a memory step on the same micro-batch. The first pair is
    untimed. Returns per-step seconds of each."""
    it = iter(loader)
    step(next(it), norms[0])
    step(memory[0], norms[0])
    times: dict[str, list[float]] = {"loader": [], "memory": []}
    for i in range(1, len(norms)):
        for name in ("loader", "memory") if i % 2 else ("memory", "loader"):
            t0 = time.perf_counter()
            step(next(it) if name == "loader" else memory[i], norms[i])
            times[name].append(time.perf_counter() - t0)
    return times["loader"], times["memory"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 4 steps of up to 256 tokens; the trainer's "
                   "variants (CUDA: 2 workers, decode on the device; CPU: 0 workers, and 2 decoding)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top-k", type=int, default=26)
    p.add_argument("--codec", default="default")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--decode", nargs="+", choices=["main", "workers"], default=["main", "workers"])
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    variants = [(w, d) for w in a.workers for d in a.decode if not (w == 0 and d == "workers")]
    if a.quick:  # what the trainer runs: CUDA decodes on the device; on CPU workers decode, if there are any
        a.rounds, a.steps, a.samples, a.max_len = 2, 4, 256, 256
        variants = [(2, "main")] if cuda else [(0, "main"), (2, "workers")]
    with tempfile.TemporaryDirectory() as tmp:
        codec = make_codec(a.codec, a.top_k, VOCAB)
        reader = store.CacheReader(build_cache(Path(tmp) / "cache", a.samples, a.min_len, a.max_len, codec))
        dataset = B.CacheDataset(reader)
        lengths, targets = reader.lengths(), reader.row_counts()
        per_epoch = len(dataset) // a.batch_size
        plans = lambda: B.PlanCache(len(dataset), a.batch_size, 1, 0, per_epoch, lengths=lengths)  # noqa: E731
        step = build_step(a.hidden, a.layers, codec)
        n = a.steps + 1
        results = {}
        for r in range(a.rounds):
            start = r * n  # fresh micro-batches each round, the same for every variant
            idx = [plans().local(m, 0) for m in range(start, start + n)]
            norms = [int(targets[i].sum()) for i in idx]
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for w, d in order:
                dec = codec if d == "workers" else None
                fn = (lambda items, dec=dec: B.collate_decoded(items, 0, dec)) if dec is not None else \
                    (lambda items: B.collate(items, 0))
                memory = [fn([dataset[i] for i in ix]) for ix in idx]
                if cuda:  # as the loader delivers them
                    memory = [pin_memory(b) for b in memory]
                loader = B.make_loader(dataset, B.MicroBatchSampler(plans(), 0, start, start + n), 0, workers=w,
                                       pin_memory=cuda, codec=dec)
                lo, me = run_pairs(step, loader, memory, norms)
                results.setdefault((w, d), []).extend(zip(lo, me))
                del loader, memory
                print(f"round {r + 1}/{a.rounds}: workers={w} decode={d} done", file=sys.stderr, flush=True)

    pad = B.padding_fraction(B.epoch_plan(len(dataset), a.batch_size, 1, 0, 0, lengths=lengths), lengths)
    pad0 = B.padding_fraction(B.epoch_plan(len(dataset), a.batch_size, 1, 0, 0), lengths)
    print(f"\nstudent: {a.layers} layers, hidden {a.hidden}, vocab {VOCAB}; batch {a.batch_size} x {a.min_len}.."
          f"{a.max_len} tokens (half targets), 2 teachers, codec {a.codec} k={a.top_k}; {'cuda' if cuda else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}; {a.rounds} rounds x {a.steps} steps; padding {pad:.1%} "
          f"with length grouping ({pad0:.1%} without)\n")
    print("| workers | decode | loader step (median s) | memory step (median s) | overhead (total) | "
          "overhead (median pair) |")
    print("|---|---|---|---|---|---|")
    out = {}
    for w, d in variants:
        lo, me = zip(*results[(w, d)])
        total = sum(lo) / sum(me) - 1
        paired = statistics.median(x / y for x, y in results[(w, d)]) - 1
        out[f"workers={w},decode={d}"] = {"loader_s": statistics.median(lo), "memory_s": statistics.median(me),
                                          "overhead_total": total, "overhead_median_pair": paired}
        print(f"| {w} | {d} | {statistics.median(lo):.4f} | {statistics.median(me):.4f} | {100 * total:+.1f}% | "
              f"{100 * paired:+.1f}% |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
