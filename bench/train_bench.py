"""Training step throughput: teachers read from the cache vs teachers run every step (online), and plain CE.

    python bench/train_bench.py --quick          # 3 timed steps x 2 repeats per mode (~2-3 min on 2 cores)
    python bench/train_bench.py                  # 8 timed steps x 3 repeats per mode (~3-5 min)
    python bench/train_bench.py --no-trl         # only distill's two modes
    python bench/train_bench.py --tiny           # tiny models, char tokenizer: a smoke test (the tests run this)

The bars (DESIGN.md section 6): with 3 teachers of the student's size, a training step
from the cache is >= 1.9x faster than online distillation running the teachers each step;
a cached-teacher distillation step costs <= 1.10x a plain cross-entropy (SFT) step.

Models: one Llama-style config for the student and its 3 teachers (random init, seeds
0..3; hidden 256, 4 layers, 4 heads, MLP 704, tied embeddings: 15.8M parameters, 12.6M
of them the embedding), vocabulary 49,152 (the SmolLM2 tokenizer, via distill.smollm).
The final norm is scaled at init so the teachers' distributions are peaked like a
trained LM's (`--logit-scale`). Data: the first GSM8K rows shipped in bench/data
(question = prompt, answer = response; targets = the response tokens), max_length 256,
`--batch-size` 2 samples a step (~0.8 s of CPU a cached step on the 2-core reference box).
fp32 on CPU, `--threads` torch threads (default 1: steadier on a shared machine).

Modes, all on the same micro-batches (the trainer's seeded plan), each with its own
student (same init) and AdamW:
  cache    records read from a real cache that `run_capture` wrote for the 3 teachers
           (the default codec with its default top_k), collated and decoded inside the
           timed step, one process, no loader workers.
  online   the same tokens; the 3 teachers loaded as online teachers (`train.online_teachers`)
           and run every step (`signals.LiveTeacher`: inference mode, LM head on target rows
           only, top-k, then the cache codec's encode + decode, so the signal is the cache's).
  ce       the floor: the same student, AdamW, clipping and schedule, plain cross-entropy on
           the same target tokens; the LM head on the target rows only, like the distillation
           step's chunked head, so the ratio measures what distillation adds (decode, the
           chunked k+1-bin loss) and not a difference in which positions reach the head. (HF's
           `model(labels=)` step would run the head on every position: a slower, unfair floor.)
  trl      reference: TRL's GKDTrainer (trl 1.16, experimental) with ONE teacher
           (teacher 1), lmbda=0 (the data's tokens, no student generation), beta=0
           (forward KL, like distill's default), on the same batches, through its own
           Trainer loop. Dense: full student and teacher logits at every position.
cache and online call the library's one step, `distill.step.TrainStep` (the trainer's: student
forward + chunked distill_loss, the loss sum normalised by the step's target tokens, backward,
finiteness check, gradient clipping, AdamW step, LR schedule) with a `signals.Teachers` over
the cached or the live source; only where the TeacherSignal comes from differs.

Timing: every repeat replays the same batches: per mode, one untimed warm-up step, then
`--steps` timed steps. Modes are interleaved and their order rotates between repeats, so
a change in the machine's load hits every mode alike. A mode's figure is its fastest
repeat (wall) and its least CPU time (thread CPU, steadier on a loaded machine).
Throughput counts target tokens (what the loss sees), like the trainer's tokens_per_s;
online / cache is the speed-up the cache buys; cache / ce what distillation costs over SFT.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
sys.path.insert(0, str(ROOT))

from distill import batches as B  # noqa: E402
from distill import train as T  # noqa: E402
from distill.cache.capture import run_capture  # noqa: E402
from distill.cache.store import CacheReader  # noqa: E402
from distill.config import load_recipe  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.signals import CachedTeachers, Teachers, load_live_teachers  # noqa: E402
GSM8K = ROOT / "bench" / "data" / "gsm8k" / "train.jsonl"


# ---------------------------------------------------------------- the world: models, data, cache


def tokenizer_for(args):
    if args.tiny:
        from experiments.synthetic.toy import build_tokenizer

        return build_tokenizer()
    from distill.smollm import smollm2_path

    return load_tokenizer(str(smollm2_path()))


def save_models(work: Path, tok, args) -> dict[str, Path]:
    """Student (seed 0) and teachers t1..t3 (seeds 1..3): one Llama config, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(512, args.max_length),
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    paths = {}
    for seed, name in enumerate(["student"] + [f"t{i + 1}" for i in range(args.teachers)]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        # Final RMSNorm weight scaled (x16: next-token entropy ~2.5 nats, SmolLM2's is 2.3 on such text),
        # so the teachers' distributions are peaked rather than near-uniform and the losses mean
        # something; it changes no cost. (Scaling the tied embeddings instead makes every model
        # predict its input token with p ~ 1, all alike.)
        with torch.no_grad():
            model.get_decoder().norm.weight.mul_(args.logit_scale)
        paths[name] = work / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def write_recipe(work: Path, paths: dict[str, Path], args) -> Path:
    with GSM8K.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.samples))]
    if len(rows) < args.samples:
        raise SystemExit(f"{GSM8K} has {len(rows)} rows, fewer than the {args.samples} samples asked for")
    data = work / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n" for r in rows))
    recipe = {
        "name": "train-bench", "run_dir": str(work / "run"), "seed": 0,
        "teachers": [{"name": n, "model": str(p)} for n, p in paths.items() if n != "student"],
        "student": {"model": str(paths["student"])},
        "data": {"sources": [{"path": str(data)}], "max_length": args.max_length},
        "cache": {"dir": str(work / "cache"), "top_k": args.top_k, "codec": args.codec, "batch_size": 8},
        "train": {"batch_size": args.batch_size, "lr": 1e-4, "max_steps": 1000, "mixed_precision": "no"},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------- the library step, two signal sources; the CE floor


class Student:
    """A student as the trainer builds it (StudentWithLoss, AdamW, LR schedule, prepared by accelerate),
    stepped by the library's TrainStep with the given teachers (cached or live)."""

    def __init__(self, acc, recipe, teachers: Teachers):
        self.step, _ = T.build_train_step(recipe, acc, teachers, recipe.train.max_steps)
        self.params = self.step.params

    def __call__(self, batch: dict) -> float:
        norm = int(batch["select"].sum())  # target tokens of the step (one micro-batch, one process)
        return self.step([batch], norm)["loss_sum"].item() / max(norm, 1)


class CEStudent:
    """The SFT floor: the same student, optimizer, clipping and schedule, plain cross-entropy on the
    same target tokens. Head on the target rows only (as the distillation step's chunked head), the
    loss summed and divided by the same target-token count; no teachers, no chunking."""

    def __init__(self, acc, recipe):
        t = recipe.train
        model = T.build_student(recipe, acc.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(t.schedule, t.warmup_steps, t.max_steps))
        self.model, self.opt = acc.prepare(model, opt)
        self.acc, self.max_grad_norm = acc, t.max_grad_norm

    def __call__(self, batch: dict) -> float:
        norm = int(batch["select"].sum())
        with self.acc.accumulate(self.model):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True, logits_to_keep=1, use_cache=False)
            hidden = out.hidden_states[-1][:, :-1][batch["select"]]
            logits = self.acc.unwrap_model(self.model).get_output_embeddings()(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits, batch["targets"], reduction="sum")
            self.acc.backward(loss / max(norm, 1))
        if self.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item() / max(norm, 1)


def no_records(item: dict) -> dict:
    """A cache item stripped of its teacher rows: the online mode reads only tokens."""
    return {**item, "records": item["records"][:0]}


# ---------------------------------------------------------------- TRL's GKD trainer (reference)


def build_trl(recipe, paths, tok, dataset, args, work: Path):
    """GKDTrainer on the same batches, one teacher; returns (trainer, step_times list) or (None, reason)."""
    try:
        from transformers import TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to print
        return None, f"cannot import trl's GKDTrainer ({type(exc).__name__}: {str(exc)[:120]})"

    times: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            times.append((time.perf_counter(), time.thread_time()))

    def collate(rows):
        batch = B.collate([no_records(dataset[i]) for i in rows[0]["batch"]], tok.pad_token_id)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 1:] = torch.where(batch["select"], batch["input_ids"][:, 1:], -100)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    t = recipe.train
    cfg = GKDConfig(output_dir=str(work / "trl"), per_device_train_batch_size=1, max_steps=args.steps + 1,
                    lmbda=0.0, beta=0.0, seq_kd=False, learning_rate=t.lr, weight_decay=t.weight_decay,
                    max_grad_norm=t.max_grad_norm, lr_scheduler_type="cosine", bf16=False, fp16=False,
                    use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                    train_sampling_strategy="sequential", dataloader_num_workers=0, max_length=None,
                    disable_dropout=True, seed=recipe.seed)
    try:
        student = load_model(str(paths["student"]), dtype="float32")
        teacher = load_model(str(paths["t1"]), dtype="float32").eval()
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, data_collator=collate,
                             train_dataset=_trl_rows([[0]]), processing_class=tok, callbacks=[Clock()])
    except Exception as exc:  # noqa: BLE001
        return None, f"GKDTrainer could not be built ({type(exc).__name__}: {str(exc)[:160]})"
    return (trainer, times), None


def _trl_rows(batches: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"batch": batches})


def trl_chunk(handle, batches: list[list[int]]) -> tuple[list[float], list[float]]:
    """trainer.train() over `batches` (first one untimed): wall and CPU seconds of each later step,
    from the end of one step to the end of the next (the trainer's whole loop: data, step, callbacks)."""
    trainer, times = handle
    trainer.train_dataset = _trl_rows(batches)
    times.clear()
    with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints a metrics dict at the end of train()
        trainer.train()
    wall, cpu = np.diff(np.array(times), axis=0).T
    return list(wall), list(cpu)


# ---------------------------------------------------------------- the benchmark


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed steps x 2 repeats, 40 samples")
    ap.add_argument("--tiny", action="store_true", help="tiny models and char tokenizer (smoke test, no verdict)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="samples per step")
    ap.add_argument("--logit-scale", type=float, default=16.0, help="final-norm scale at init (peaked logits)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=None, help="cache.top_k (default: the codec's own)")
    ap.add_argument("--codec", default="default")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's GKDTrainer")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--workdir", type=Path, default=None, help="where models and the cache go (default: temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw step times here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 2)
    if args.tiny:
        args.steps, args.repeats, args.batch_size = 1, 1, 2
        args.hidden, args.mlp, args.layers, args.heads, args.max_length = 32, 64, 2, 4, 512
    # One micro-batch per step; every repeat replays the same steps + 1 batches (the first one untimed),
    # so repeats, and modes, are timed on exactly the same tokens.
    args.samples = (args.steps + 1) * args.batch_size
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="train-bench-", dir=args.workdir))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> dict:
    t0 = time.perf_counter()
    tok = tokenizer_for(args)
    paths = save_models(work, tok, args)
    recipe_path = write_recipe(work, paths, args)
    recipe = load_recipe(recipe_path)
    rep = run_capture(recipe)
    reader = CacheReader(recipe.cache.dir)
    dataset = B.CacheDataset(reader)
    codec = reader.codec()
    plans = B.PlanCache(len(dataset), args.batch_size, 1, recipe.seed, len(dataset) // args.batch_size)
    batches = [plans.batch(j) for j in range(args.steps + 1)]  # the trainer's epoch-0 plan

    acc = T.build_accelerator(recipe)
    torch.manual_seed(recipe.seed)
    # The two teacher sources behind the one step: the cache's records, or the same teachers
    # loaded as online ones (the trainer's loader) and run on each micro-batch.
    live = load_live_teachers(load_recipe(recipe_path, ["train.online_teachers=true"]), codec, acc.device)
    sources = {"cache": [CachedTeachers(codec, reader.cached_names)], "online": live}
    students = {m: Student(acc, recipe, Teachers(sources[m], recipe.teachers, reader.domains, recipe.loss.weighting))
                for m in ("cache", "online")}
    students["ce"] = CEStudent(acc, recipe)
    teachers = live
    n_params = sum(p.numel() for p in students["cache"].params)
    trl, why_not = (None, "skipped (--no-trl)") if args.no_trl else build_trl(recipe, paths, tok, dataset, args, work)
    modes = ["cache", "online", "ce"] + (["trl"] if trl else [])
    print(f"# student and {len(teachers)} teachers: Llama hidden {args.hidden}, {args.layers} layers, MLP {args.mlp}, "
          f"V = {len(tok)}, {n_params / 1e6:.1f}M params each; {len(dataset)} cached samples "
          f"({reader.manifest['data']['targets']} targets, {codec.name} k={codec.k}, capture {rep.forward_s:.1f} s); "
          f"batch {args.batch_size}, {args.steps} timed steps x {args.repeats} repeats; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}; setup {time.perf_counter() - t0:.0f} s", flush=True)

    def run_mode(mode: str) -> tuple[list[float], list[float], list[float]]:
        """Wall and thread-CPU seconds of each timed step, and each step's loss."""
        if mode == "trl":
            return (*trl_chunk(trl, batches), [])
        times, cpu, losses = [], [], []
        for j, idx in enumerate(batches):
            t, c = time.perf_counter(), time.thread_time()
            # Collating (and, for the cache, decoding inside the step) is timed, as in the trainer.
            items = [dataset[i] if mode == "cache" else no_records(dataset[i]) for i in idx]
            losses.append(students[mode](B.collate(items, tok.pad_token_id)))
            if j:  # the first step of a repeat is the untimed warm-up
                times.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
        return times, cpu, losses

    targets = sum(int(dataset.targets()[idx].sum()) for idx in batches[1:])
    runs = {m: [] for m in modes}
    first_loss = {}
    for r in range(args.repeats):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        line = []
        for mode in order:
            times, cpu, losses = run_mode(mode)
            runs[mode].append({"times": times, "cpu": cpu, "load": os.getloadavg()[0]})
            first_loss.setdefault(mode, losses[:1])
            line.append(f"{mode} {sum(times):.2f} s ({sum(cpu):.2f} s CPU)")
        print(f"# repeat {r + 1}: " + ", ".join(line) + f" | load {os.getloadavg()[0]:.1f}", flush=True)
    result = summarize(runs, args, targets)
    result["first_loss"] = first_loss
    print(table(result, why_not))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": result}, indent=1))
    return result


def summarize(runs: dict, args, targets: int) -> dict:
    """Per mode, the fastest repeat (wall) and the least CPU; ratios to cache, also repeat by repeat."""
    out = {"steps": args.steps, "repeats": args.repeats, "targets": targets, "modes": {}}
    for mode, reps in runs.items():
        total = min(sum(x["times"]) for x in reps)
        out["modes"][mode] = {"step_s": total / args.steps, "steps_per_s": args.steps / total,
                              "tokens_per_s": targets / total,
                              "cpu_step_s": min(sum(x["cpu"]) for x in reps) / args.steps,
                              "all_repeats_s": [round(sum(x["times"]), 2) for x in reps]}
    m = out["modes"]
    out["speedup"] = m["online"]["step_s"] / m["cache"]["step_s"]
    out["speedup_cpu"] = m["online"]["cpu_step_s"] / m["cache"]["cpu_step_s"]
    out["speedup_per_repeat"] = [round(sum(o["times"]) / sum(c["times"]), 2)
                                 for o, c in zip(runs["online"], runs["cache"])]
    out["cache_vs_ce"] = m["cache"]["step_s"] / m["ce"]["step_s"]
    out["cache_vs_ce_cpu"] = m["cache"]["cpu_step_s"] / m["ce"]["cpu_step_s"]
    return out


def table(s: dict, why_not: str | None) -> str:
    names = {"cache": "cache (3 teachers, from disk)", "online": "online (3 teachers run each step)",
             "ce": "ce (SFT floor, no teachers)", "trl": "TRL GKDTrainer (1 teacher, dense, lmbda=0)"}
    lines = ["| mode | s/step | steps/s | target tokens/s | / cache | CPU s/step | / cache (CPU) "
             "| every repeat (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    cache = s["modes"]["cache"]
    for mode, r in s["modes"].items():
        lines.append(f"| {names[mode]} | {r['step_s']:.3f} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['step_s'] / cache['step_s']:.2f}x | {r['cpu_step_s']:.3f} "
                     f"| {r['cpu_step_s'] / cache['cpu_step_s']:.2f}x | {', '.join(map(str, r['all_repeats_s']))} |")
    if "trl" not in s["modes"]:
        lines.append(f"| {names['trl']} | not run: {why_not} | | | | | | |")
    lines += ["", f"cache vs online: **{s['speedup']:.2f}x** faster per step (bar: >= 1.9x); "
              f"{s['speedup_cpu']:.2f}x in CPU time; per repeat {s['speedup_per_repeat']}; "
              f"{s['repeats']} interleaved repeats of the same {s['steps']} timed steps ({s['targets']} target tokens)",
              f"cache vs ce (SFT): **{s['cache_vs_ce']:.2f}x** the CE step's time (bar: <= 1.10x); "
              f"{s['cache_vs_ce_cpu']:.2f}x in CPU time",
              "first-step loss (same batch; cache and online through the same codec; ce is the CE loss): "
              + ", ".join(f"{m} {v[0]:.4f}" for m, v in s["first_loss"].items() if v)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
