"""Peak memory and time of loss forward+backward: chunked distill_loss vs the dense reference (and Liger).

    python bench/loss_bench.py --quick        # the DESIGN.md shape: B*T=4096, V=49152, H=576, 1 and 3 teachers
    python bench/loss_bench.py                # full grid: B*T {1024,4096} x V {49152,128256} x H {576,2048} x N {1,3}
    python bench/loss_bench.py --bt 1024 --vocab 49152 --hidden 576 --teachers 1 --impl chunked dense

Every (implementation, shape) runs in a fresh subprocess, fp32 on CPU, k = 32
teacher tokens, "fixed" weighting, divergence jsd (Liger's), ce_weight 0.5.

Memory method: the child builds the inputs, runs one small warm-up pass (thread
pools, MKL buffers), then reads VmRSS, resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), runs forward+backward once and reads VmHWM.
Peak = VmHWM - VmRSS before the run: the extra resident memory the loss needed,
gradients of hidden and head weight included, inputs excluded. glibc is told to
hand every allocation >= 64 KiB straight to mmap (MALLOC_MMAP_THRESHOLD_), so
freed tensors return to the OS and nothing is served from a cache that a
previous pass filled. Time: wall clock of that pass. With `--repeats R` each
implementation runs R times, interleaved (dense, chunked, liger, dense, ...),
each in a fresh process; the fastest pass and the largest peak are reported, so
a change in the load of a shared machine hits every implementation alike.

"dense" is tests/loss_reference.py: plain autograd over full [M, V] logits.
"floor" is the size of one fp32 [M, V] tensor, the least any dense path holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("chunked", "dense", "liger")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(torch, m, vocab, hidden, teachers, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (3.0 / hidden ** 0.5)
    # Distinct ids per row (a top-k never repeats a token): k evenly spaced ids from a random start.
    start = torch.randint(0, vocab, (teachers, m, 1), generator=g)
    ids = (start + torch.arange(k) * (vocab // k)) % vocab
    residual = torch.rand(teachers, m, generator=g) * 0.3 + 0.01
    logprobs = torch.log_softmax(2 * torch.randn(teachers, m, k, generator=g), -1) + torch.log1p(-residual)[..., None]
    targets = torch.randint(0, vocab, (m,), generator=g)
    return h, w, ids, logprobs, residual.log(), targets


def _step_fn(torch, impl, m, vocab, hidden, teachers, k, chunk, divergence):
    """Build inputs for one case; return a function running forward+backward."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from distill.config import LossConfig

    cfg = LossConfig(divergence=divergence, ce_weight=0.5, chunk_size=chunk)
    h, w, ids, logprobs, log_res, targets = _inputs(torch, m, vocab, hidden, teachers, k)
    h.requires_grad_(True)
    w.requires_grad_(True)
    tw = torch.ones(teachers, m)
    if impl == "chunked":
        from distill.loss import TeacherSignal, distill_loss

        sig = TeacherSignal(ids, logprobs, log_res)
        return lambda: distill_loss(h, w, None, sig, targets, tw, cfg).loss_sum.backward()
    if impl == "dense":
        from loss_reference import dense_loss

        return lambda: dense_loss(h, w, None, ids, logprobs, log_res, targets, tw, cfg)[0].backward()
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    if teachers != 1:
        raise ValueError("Liger's distillation losses take one (dense) teacher")
    # Liger's teacher is a full LM head: its own hidden states and weight, logits per chunk.
    th = torch.randn(m, hidden)
    tw_head = w.detach().clone()
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                      compiled=False, chunk_size=chunk)
    return lambda: loss_fn(h, w, th, tw_head, targets).backward()


def run_case(args) -> dict:
    """In the child process: one implementation, one shape."""
    import torch

    torch.manual_seed(0)
    case = dict(m=args.case_m, vocab=args.case_v, hidden=args.case_h, teachers=args.case_n, k=args.k,
                chunk=args.chunk_size, divergence=args.divergence)
    warm = _step_fn(torch, args.case_impl, **{**case, "m": min(case["m"], 128)})
    warm()
    del warm
    step = _step_fn(torch, args.case_impl, **case)
    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"peak_mib": (_status_kib("VmHWM") - rss0) / 1024, "time_s": seconds, "times": [seconds]}


def _spawn(impl, m, vocab, hidden, teachers, args) -> dict:
    cmd = [sys.executable, __file__, "--_case", impl, str(m), str(vocab), str(hidden), str(teachers),
           "--k", str(args.k), "--chunk-size", str(args.chunk_size),
           "--divergence", args.divergence]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {args.timeout}s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fits(m, vocab, impl, teachers, budget_mib) -> bool:
    # Rough upper bound of the dense reference: ~(6 + 2N) fp32 [M, V] tensors alive at once.
    if impl != "dense":
        return True
    return (6 + 2 * teachers) * m * vocab * 4 / 2 ** 20 <= budget_mib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only B*T=4096, V=49152, H=576 (1 and 3 teachers)")
    p.add_argument("--bt", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    p.add_argument("--teachers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=None, help="default: LossConfig().chunk_size")
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--repeats", type=int, default=2, help="interleaved passes per implementation")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--mem-budget-mib", type=float, default=12000, help="skip dense cases estimated above this")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--_case", nargs=5, metavar=("IMPL", "M", "V", "H", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        sys.path.insert(0, str(ROOT))
        from distill.config import LossConfig

        args.chunk_size = LossConfig().chunk_size
    if args._case:
        args.case_impl = args._case[0]
        args.case_m, args.case_v, args.case_h, args.case_n = map(int, args._case[1:])
        print(json.dumps(run_case(args)))
        return
    if args.quick:
        args.bt, args.vocab, args.hidden = [4096], [49152], [576]
    print(f"# fp32 CPU, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, k={args.k}, "
          f"chunk={args.chunk_size}, divergence={args.divergence}, repeats={args.repeats}")
    header = ("| B*T | V | H | N | floor MiB | dense MiB | chunked MiB | mem ratio | dense s | chunked s "
              "| time ratio | liger MiB | liger s |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for m, vocab, hidden, n in itertools.product(args.bt, args.vocab, args.hidden, args.teachers):
        res = {}
        for impl in args.impl:
            if impl == "liger" and n != 1:
                res[impl] = {"error": "n/a (one dense teacher)"}
            elif not _fits(m, vocab, impl, n, args.mem_budget_mib):
                res[impl] = {"error": "skipped (memory budget)"}
        # Interleave the implementations, one fresh process per pass, so that a change in the
        # machine's load hits them alike; keep the fastest pass and the largest peak.
        for _ in range(args.repeats):
            for impl in args.impl:
                if impl in res and "error" in res[impl]:
                    continue
                one = _spawn(impl, m, vocab, hidden, n, args)
                if "error" in one:
                    res[impl] = one
                    continue
                prev = res.setdefault(impl, {"peak_mib": 0.0, "time_s": float("inf"), "times": []})
                prev["peak_mib"] = max(prev["peak_mib"], one["peak_mib"])
                prev["time_s"] = min(prev["time_s"], one["time_s"])
                prev["times"] += one["times"]
        rows.append({"bt": m, "vocab": vocab, "hidden": hidden, "teachers": n, **res})
        print(_row(m, vocab, hidden, n, res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _row(m, vocab, hidden, n, res) -> str:
    def mib(r):
        return f"{r['peak_mib']:.0f}" if "peak_mib" in r else r.get("error", "-")

    def sec(r):
        return f"{r['time_s']:.2f}" if "time_s" in r else "-"

    c, d, lg = (res.get(i, {}) for i in IMPLS)
    mem = f"{c['peak_mib'] / d['peak_mib']:.1%}" if "peak_mib" in c and "peak_mib" in d else "-"
    tim = f"{c['time_s'] / d['time_s']:.2f}" if "time_s" in c and "time_s" in d else "-"
    floor = m * vocab * 4 / 2 ** 20
    return (f"| {m} | {vocab} | {hidden} | {n} | {floor:.0f} | {mib(d)} | {mib(c)} | {mem} | {sec(d)} | {sec(c)} "
            f"| {tim} | {mib(lg)} | {sec(lg)} |")


if __name__ == "__main__":
    main()
