"""`distill train`: distil every cached teacher into one student with a plain accelerate loop.

    distill train recipe.yaml                                   # one process (CPU or one GPU)
    accelerate launch -m distill train recipe.yaml              # DDP / DeepSpeed, per `accelerate config`
    accelerate launch --config_file launch/ddp.yaml -m distill train recipe.yaml train.lr=2e-5
    distill train recipe.yaml --resume                          # continue from the last checkpoint

The loop: build -> accelerator.prepare -> for each micro-batch: with accumulate():
forward + loss, backward, clip, step. The student forward and the loss run inside
one module (`StudentWithLoss`) so DDP and DeepSpeed see every parameter use inside
their forward. The loss is a token SUM; it is normalised once, by the number of
target tokens of the whole optimizer step across micro-batches and ranks, which
every rank computes locally from the deterministic batch plan.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distill import batches as B
from distill import checkpoint as ckpt
from distill.cache.manifest import check_recipe
from distill.cache.store import CacheReader
from distill.cache.tail import student_codec
from distill.distributed import accelerate_cpu, gloo_needed
from distill.config import Recipe, recipe_dict
from distill.errors import DistillError
from distill.loss import TeacherSignal, distill_loss, example_weights
from distill.models import (check_param_limit, config_vocab_size, load_model, load_tokenizer, save_pretrained,
                            tokenizer_fingerprint)


class StudentWithLoss(torch.nn.Module):
    """Student forward + chunked multi-teacher loss, as one module for DDP/DeepSpeed."""

    def __init__(self, student, loss_cfg):
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg
        self.config = student.config  # DeepSpeed's "auto" bucket sizes are read from model.config.hidden_size

    def forward(self, input_ids, attention_mask, select, targets, signal: TeacherSignal, token_weights):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           logits_to_keep=1, use_cache=False)
        # hidden[:, t] predicts token t+1; keep only positions whose next token is a target.
        hidden = out.hidden_states[-1][:, :-1][select]
        head = self.student.get_output_embeddings()
        res = distill_loss(hidden, head.weight, getattr(head, "bias", None), signal, targets, token_weights,
                           self.loss_cfg)
        return {"loss_sum": res.loss_sum, "n_tokens": res.n_tokens, "div": res.teacher_div_sums,
                "share": res.teacher_weight_sums, "ce": res.ce_sum}

    def register_head_with_zero3(self) -> None:
        """ZeRO-3 gathers a parameter only inside its owning module's forward, but the chunked
        loss reads the LM head's weight (and bias) directly. Registering them as external
        parameters of this wrapper makes DeepSpeed gather them for the wrapper's forward and
        backward, and partition them again afterwards (works for tied embeddings and LoRA too)."""
        import deepspeed

        head = self.student.get_output_embeddings()
        for p in (head.weight, getattr(head, "bias", None)):
            if isinstance(p, torch.nn.Parameter):
                deepspeed.zero.register_external_parameter(self, p)


@dataclass
class TrainResult:
    steps: int
    planned_steps: int
    tokens: int
    stopped_by: str  # "done" | "budget"
    wall_s: float
    final_loss: float | None
    student_dir: str
    checkpoint: str | None
    padding_fraction: float | None = None  # padded / all tokens of the first epoch's micro-batches
    padding_fraction_ungrouped: float | None = None  # the same without length grouping


def build_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    mp = recipe.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Multi-process on CPU needs gloo (DeepSpeed included); a plain single process needs no group.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if gloo_needed() else []
    acc = Accelerator(cpu=accelerate_cpu(),
                      gradient_accumulation_steps=recipe.train.grad_accum, mixed_precision=mp,
                      log_with="wandb" if recipe.wandb.enabled else None, kwargs_handlers=handlers,
                      project_config=ProjectConfiguration(project_dir=recipe.run_dir))
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # we feed our own loader, so DeepSpeed cannot infer the micro-batch size
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
        if ds.deepspeed_config.get("gradient_clipping") == "auto":
            ds.deepspeed_config["gradient_clipping"] = recipe.train.max_grad_norm
    return acc


def zero_stage(acc) -> int:
    """The DeepSpeed ZeRO stage of this run, 0 without DeepSpeed."""
    ds = acc.state.deepspeed_plugin
    return 0 if ds is None else int(ds.zero_stage)


def setup_line(acc) -> str:
    """e.g. 'DeepSpeed ZeRO-3, 2 processes on cpu, mixed precision no'."""
    stage = zero_stage(acc)
    how = f"DeepSpeed ZeRO-{stage}" if acc.state.deepspeed_plugin is not None else (
        "DDP" if acc.num_processes > 1 else "single process")
    return f"{how}, {acc.num_processes} process{'es' if acc.num_processes > 1 else ''} on {acc.device.type}, " \
           f"mixed precision {acc.mixed_precision}"


def check_cache(reader: CacheReader, recipe: Recipe, tok):
    """Refuse a cache this recipe would not make, or a student that cannot read it, before any weights load.

    Returns the codec the student decodes the cache with: the cache's own, fitted to the
    student's vocabulary when that has more or fewer (padding) rows than the teachers'."""
    check_recipe(reader.manifest, recipe, tokenizer_fingerprint(tok), reader.dir)
    s = recipe.student
    vocab = config_vocab_size(s.model, revision=s.revision, gguf_file=s.gguf_file,
                              trust_remote_code=recipe.trust_remote_code, what="student.model")
    return student_codec(reader.codec(), vocab, len(tok))


def build_student(recipe: Recipe, device):
    s = recipe.student
    model = load_model(s.model, revision=s.revision, gguf_file=s.gguf_file, dtype=s.dtype,
                       trust_remote_code=recipe.trust_remote_code, what="student.model")
    check_param_limit(model, s.max_params)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                                 target_modules=s.lora.target_modules, task_type="CAUSAL_LM"))
        if hasattr(model.get_output_embeddings(), "lora_A"):
            # The chunked loss multiplies by the head's weight itself, so an adapter there would be ignored.
            raise DistillError(f"student.lora.target_modules: {s.lora.target_modules} puts an adapter on the "
                               "output head; leave the head out (the chunked loss reads the head weight directly)")
    return model


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


class Budget:
    """Decides, before each optimizer step, whether one more step and the final save still fit."""

    def __init__(self, start: float, minutes: float | None, reserve_minutes: float, save_guess_s: float):
        self.deadline = None if minutes is None else start + (minutes - reserve_minutes) * 60
        self.step_s: list[float] = []
        self.save_s = save_guess_s

    def fits_another_step(self, now: float) -> bool:
        if self.deadline is None:
            return True
        recent = self.step_s[-20:]
        step = max(recent) if recent else 0.0
        return now + step + self.save_s < self.deadline


def _save_student(acc, wrapped, tok, out: Path) -> None:
    """Gather (ZeRO-3 included) and save a `from_pretrained`-loadable student; LoRA is merged."""
    state = acc.get_state_dict(wrapped)
    model = acc.unwrap_model(wrapped).student
    if acc.is_main_process:
        state = {k.removeprefix("student."): v for k, v in state.items()}
        if hasattr(model, "merge_and_unload"):
            adapter_dir = out.with_name(out.name + "_adapter")
            model.save_pretrained(adapter_dir)
            merged = copy.deepcopy(model).merge_and_unload()
            save_pretrained(merged, tok, out)
        else:
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tok.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    acc.wait_for_everyone()


def _save_checkpoint(acc, root: Path, step: int, state: dict, keep_last: int) -> Path:
    tmp = ckpt.tmp_path(root, step)
    acc.save_state(str(tmp))  # collective under DeepSpeed
    acc.wait_for_everyone()
    final = ckpt.finalize(root, step, state, keep_last) if acc.is_main_process else root / tmp.name[:-4]
    acc.wait_for_everyone()
    return final


def run_train(recipe: Recipe, resume: bool = False, start: float | None = None, log=print) -> TrainResult:
    start = time.time() if start is None else start
    t = recipe.train
    acc = build_accelerator(recipe)
    torch.manual_seed(recipe.seed)
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / "checkpoints"

    reader = CacheReader(recipe.cache.dir)
    tok = load_tokenizer(recipe.tokenizer or recipe.student.model,
                         gguf_file=None if recipe.tokenizer else recipe.student.gguf_file,
                         trust_remote_code=recipe.trust_remote_code, what="student tokenizer")
    codec = check_cache(reader, recipe, tok)  # the cache's codec (and id order), not the recipe's
    dataset = B.CacheDataset(reader)
    targets_per_sample = dataset.targets()
    lengths = reader.lengths()

    student = build_student(recipe, acc.device)
    wrapped = StudentWithLoss(student, recipe.loss)
    if zero_stage(acc) == 3:
        wrapped.register_head_with_zero3()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    micro_per_epoch = len(dataset) // (t.batch_size * acc.num_processes)  # full global batches per epoch
    if micro_per_epoch == 0:
        raise DistillError(f"train.batch_size: {t.batch_size} x {acc.num_processes} processes is more than the "
                           f"{len(dataset)} cached samples")
    plan_args = (len(dataset), t.batch_size, acc.num_processes, recipe.seed)
    grouping = {"lengths": lengths if t.group_by_length else None, "group_batches": t.group_batches}
    plans = B.PlanCache(*plan_args, micro_per_epoch, **grouping)
    padding = (B.padding_fraction(plans.get(0), lengths), B.padding_fraction(B.epoch_plan(*plan_args, 0), lengths))
    planned = t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, t.warmup_steps, planned))
    wrapped, opt = acc.prepare(wrapped, opt)
    log(f"train: {setup_line(acc)}")
    acc.register_for_checkpointing(sched)

    step, micro, tokens_seen = 0, 0, 0
    if resume:
        if acc.is_main_process:
            ckpt.clean_tmp(ckpt_root)
        last = ckpt.latest(ckpt_root)
        if last is None:
            raise DistillError(f"--resume: no complete checkpoint under {ckpt_root}")
        ckpt.verify(last)
        acc.load_state(str(last))
        st = ckpt.read_state(last)
        step, micro, tokens_seen = st["step"], st["micro"], st["tokens"]
        log(f"resumed from {last} at step {step}")

    # The loader walks the same plan from the resume position, with its own PlanCache (it runs
    # ahead of the loop by the prefetch depth); `plans` above serves the loss normaliser.
    cuda = acc.device.type == "cuda"
    workers = t.num_workers if t.num_workers is not None else (2 if cuda else 0)
    sampler = B.MicroBatchSampler(B.PlanCache(*plan_args, micro_per_epoch, **grouping), acc.process_index,
                                  start=micro, stop=planned * t.grad_accum)
    # On CUDA the compact records go to the device and are decoded there; on CPU workers decode them.
    loader = B.make_loader(dataset, sampler, tok.pad_token_id, workers=workers, pin_memory=cuda,
                           codec=None if cuda or workers == 0 else codec)
    micro_batches = iter(loader)
    log(f"batches: {workers} loader workers per process; padding {padding[0]:.1%} of tokens "
        f"({padding[1]:.1%} without length grouping)")

    if recipe.wandb.enabled:
        init = {"mode": recipe.wandb.mode, "dir": str(run_dir), "name": recipe.wandb.run_name or recipe.name}
        if recipe.wandb.entity:
            init["entity"] = recipe.wandb.entity
        acc.init_trackers(recipe.wandb.project, config=recipe_dict(recipe), init_kwargs={"wandb": init})

    n_params = sum(p.numel() for p in params)
    budget = Budget(start, t.budget_minutes, t.eval_reserve_minutes, save_guess_s=1.0 + n_params * 16 / 200e6)
    teacher_w = [tt.weight for tt in recipe.teachers]
    teacher_dom = [tt.domains for tt in recipe.teachers]
    history = run_dir / "train_log.jsonl"
    if resume and acc.is_main_process:
        _truncate_history(history, step)
    bar = tqdm(total=planned, initial=step, desc="train", unit="step", disable=not acc.is_main_process)
    stopped_by, last_loss = "done", None
    window = _new_window()
    while step < planned:
        if not _agree(acc, budget.fits_another_step(time.time())):
            stopped_by = "budget"
            break
        t_step = time.time()
        # Target tokens of this whole optimizer step, over micro-batches and ranks: the
        # same number on every rank, known before the step, so the loss is normalised once.
        norm = sum(int(targets_per_sample[plans.batch(m)].sum()) for m in range(micro, micro + t.grad_accum))
        step_loss = torch.zeros((), device=acc.device)
        for _ in range(t.grad_accum):
            batch = next(micro_batches)
            out = _micro_step(acc, wrapped, batch, codec, teacher_w, teacher_dom, reader.domains, recipe, norm)
            micro += 1
            step_loss += out["loss_sum"]
            for key in ("loss", "tokens", "div", "share"):
                window[key] = out[key] if window[key] is None else window[key] + out[key]
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
        # One host sync per optimizer step (none per micro-batch): a non-finite loss or gradient
        # stops the run before the update, so every checkpoint on disk holds finite weights.
        _check_finite(acc, step_loss if grad_norm is None else step_loss + grad_norm, step, ckpt_root)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += norm  # global target tokens of the step (all ranks)
        budget.step_s.append(time.time() - t_step)
        bar.update(1)
        if step % t.log_every_steps == 0 or step == planned:
            last_loss = _log(acc, bar, window, step, sched, recipe, history)
        if t.save_every_steps and step % t.save_every_steps == 0 and step < planned:
            t0 = time.time()
            _save_checkpoint(acc, ckpt_root, step, {"step": step, "micro": micro, "tokens": tokens_seen}, t.keep_last)
            budget.save_s = max(budget.save_s, 2 * (time.time() - t0))
    bar.close()
    del micro_batches  # stops the loader workers before the saves
    if window["tokens"] is not None:
        last_loss = _log(acc, bar, window, step, sched, recipe, history)
    final_ckpt = _save_checkpoint(acc, ckpt_root, step, {"step": step, "micro": micro, "tokens": tokens_seen},
                                  t.keep_last)
    _save_student(acc, wrapped, tok, run_dir / "student")
    wall = time.time() - start
    result = TrainResult(step, planned, tokens_seen, stopped_by, wall, last_loss, str(run_dir / "student"),
                         str(final_ckpt), *padding)
    if acc.is_main_process:
        (run_dir / "train_result.json").write_text(json.dumps(result.__dict__, indent=1) + "\n")
        log(f"train: {step}/{planned} steps ({'stopped by the time budget' if stopped_by == 'budget' else 'done'}), "
            f"{tokens_seen} target tokens, {wall:.1f}s; student saved to {run_dir / 'student'}")
    acc.end_training()
    return result


def _agree(acc, flag: bool) -> bool:
    """All ranks take rank 0's decision (clocks differ slightly between processes)."""
    if acc.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    t = torch.tensor([1 if flag else 0], device=acc.device)
    return bool(broadcast(t, from_process=0).item())


def _micro_step(acc, wrapped, batch: dict, codec, teacher_w, teacher_dom, domain_names: list[str],
                recipe: Recipe, norm: int) -> dict:
    dev = acc.device
    if "signal" in batch:  # decoded by a loader worker
        signal = TeacherSignal(*(x.to(dev, non_blocking=True) for x in batch["signal"]))
    else:
        signal = B.decode_signal(codec, batch["records"].to(dev, non_blocking=True))
    names = [None if d < 0 else domain_names[d] for d in batch["domains"].tolist()]
    ex_w = example_weights(teacher_w, teacher_dom, names, recipe.loss.weighting).to(dev)
    token_w = ex_w[:, batch["row_sample"].to(dev)]
    with acc.accumulate(wrapped):
        out = wrapped(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["select"].to(dev),
                      batch["targets"].to(dev), signal, token_w)
        # accelerate divides by grad_accum and DDP/DeepSpeed average over ranks: undo both,
        # so the gradient is exactly sum(token losses) / (global target tokens of the step).
        scale = acc.num_processes * recipe.train.grad_accum / max(norm, 1)
        acc.backward(out["loss_sum"] * scale)
    # Device tensors, summed over the log window; nothing here waits for the device.
    loss_sum = out["loss_sum"].detach().float()
    return {"loss_sum": loss_sum, "loss": loss_sum.reshape(1),
            "tokens": torch.tensor([float(out["n_tokens"])], device=dev),
            "div": out["div"].detach().float(), "share": out["share"].detach().float()}


def _truncate_history(history: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from: a killed run logged steps it will redo."""
    if not history.exists():
        return
    lines = [x for x in history.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
    tmp = history.with_name(history.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, history)


def _new_window() -> dict:
    return {"loss": None, "tokens": None, "div": None, "share": None, "t0": time.time()}


def _check_finite(acc, value: torch.Tensor, step: int, ckpt_root: Path) -> None:
    """Raise on every rank together when any rank's loss (or the gradient norm) is not finite."""
    value = torch.as_tensor(value, dtype=torch.float32, device=acc.device).reshape(1)
    if acc.num_processes > 1:
        value = acc.reduce(value, reduction="sum")  # a NaN or inf anywhere reaches every rank
    if not bool(torch.isfinite(value).all()):
        last = ckpt.latest(ckpt_root)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise DistillError(f"training diverged at step {step + 1}: non-finite loss or gradient norm; {kept} "
                           "(try a lower train.lr or train.max_grad_norm)")


def _log(acc, bar, window: dict, step: int, sched, recipe: Recipe, history: Path) -> float | None:
    """Sum the window over ranks (a collective: every rank calls it), then log on the main process."""
    N = len(recipe.teachers)
    local = torch.cat([window["loss"], window["tokens"], window["div"], window["share"]])
    total = acc.reduce(local, reduction="sum").cpu() if acc.num_processes > 1 else local.cpu()
    n = max(float(total[1]), 1.0)
    elapsed = max(time.time() - window["t0"], 1e-9)
    metrics = {"step": step, "loss": float(total[0]) / n, "lr": sched.get_last_lr()[0],
               "tokens_per_s": float(total[1]) / elapsed}
    for i, tt in enumerate(recipe.teachers):
        metrics[f"div/{tt.name}"] = float(total[2 + i]) / n
        metrics[f"share/{tt.name}"] = float(total[2 + N + i]) / n
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    acc.log(metrics, step=step)
    if acc.is_main_process:
        with open(history, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    window.update(_new_window())
    return metrics["loss"]
