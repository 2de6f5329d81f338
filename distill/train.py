"""`distill train`: distil every cached teacher into one student with a plain accelerate loop.

    distill train recipe.yaml                                   # one process (CPU or one GPU)
    accelerate launch -m distill train recipe.yaml              # DDP / DeepSpeed, per `accelerate config`
    accelerate launch --config_file launch/ddp.yaml -m distill train recipe.yaml train.lr=2e-5
    distill train recipe.yaml --resume                          # continue from the last checkpoint

The loop: build -> accelerator.prepare -> for each optimizer step: the public
`distill.step.TrainStep` (forward + loss and backward per micro-batch, a finiteness
check, clip, update; benchmarks call the same step). The student forward and the loss
run inside one module (`StudentWithLoss`) so DDP and DeepSpeed see every parameter use
inside their forward. The loss is a token SUM; it is normalised once, by the number of
target tokens of the whole optimizer step across micro-batches and ranks, which every
rank computes locally from the deterministic batch plan. Teachers come through
`distill.signals`: cached ones from the cache, online ones (`teachers.N.online`) run on
each micro-batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import batches as B
from distill import checkpoint as ckpt
from distill.cache.manifest import check_recipe
from distill.cache.store import CacheReader
from distill.cache.tail import student_codec
from distill.distributed import accelerate_cpu, gloo_needed
from distill.config import Recipe
from distill.errors import DistillError, out_of_memory
from distill.faults import kill_point
from distill.models import (check_param_limit, config_vocab_size, load_model, load_tokenizer, resolve_dtype,
                            save_pretrained, tokenizer_fingerprint)
from distill.progress import progress
from distill.train_log import init_trackers, log_window, new_window, truncate_history
from distill.signals import CachedTeachers, Teachers, load_live_teachers
from distill.step import NonFiniteStep, StudentWithLoss, TrainStep


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
        if isinstance(ds.deepspeed_config.get("bf16"), dict):
            # ZeRO under bf16 skips an update whose gradient norm is not finite only with this
            # (fp32 always does): distill.step relies on it to never apply a non-finite step.
            ds.deepspeed_config["bf16"]["check_grad_overflow"] = True
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


def deepspeed_dtype(acc) -> torch.dtype | None:
    """The dtype DeepSpeed casts the student to (it keeps fp32 master weights itself); None without it."""
    if acc.state.deepspeed_plugin is None:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)


def student_dtypes(recipe: Recipe, device, ds_dtype: torch.dtype | None = None):
    """(dtype the student is loaded in, dtype its trainable weights are held in; None: DeepSpeed's call).

    Plain accelerate only adds autocast, so the weights AdamW updates must be fp32 here: on bf16
    weights an update below half an ulp rounds away (20 steps at lr 2e-5: 88% never change).
    A full student is loaded straight into fp32 (one copy, no bf16 detour); a LoRA student's frozen
    base keeps `student.dtype` (auto: bf16 on CUDA) and only its adapters are fp32.
    """
    s = recipe.student
    if recipe.train.pure_bf16:
        if ds_dtype is not None:
            raise DistillError("train.pure_bf16: DeepSpeed's bf16 mode always keeps fp32 master weights; "
                               "drop pure_bf16 or launch without DeepSpeed")
        return torch.bfloat16, torch.bfloat16
    if ds_dtype is not None:  # DeepSpeed casts the module to its dtype: load in it, not in fp32 first
        return (ds_dtype if s.dtype == "auto" else resolve_dtype(s.dtype)), None
    if s.dtype != "auto":
        return resolve_dtype(s.dtype), torch.float32
    return (resolve_dtype("auto", device) if s.lora is not None else torch.float32), torch.float32


def build_student(recipe: Recipe, device, ds_dtype: torch.dtype | None = None):
    """The student, trainable weights in the dtype `student_dtypes` gives; `ds_dtype` as `deepspeed_dtype`."""
    s = recipe.student
    load_dtype, train_dtype = student_dtypes(recipe, device, ds_dtype)
    model = load_model(s.model, revision=s.revision, gguf_file=s.gguf_file, dtype=load_dtype,
                       trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle,
                       what="student.model")
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
    if s.init is not None:  # merge, then distill: start from the merge of the experts
        from distill.merge import init_from_merge

        init_from_merge(recipe, model)
    if train_dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.dtype != train_dtype:
                p.data = p.data.to(train_dtype)  # in place: tied weights stay one parameter
    if recipe.train.pure_bf16:
        warnings.warn("train.pure_bf16: the student's weights and AdamW state are bf16, with no fp32 master "
                      "copy; an update below half a bf16 ulp (~0.2% of the weight) rounds away, so at "
                      "fine-tuning learning rates most weights may never change. Leave it off to train fp32 "
                      "master weights under bf16 autocast.", UserWarning, stacklevel=2)
    return model


def save_guess_s(model, trainable) -> float:
    """Seconds the final save may take, until a checkpoint save is measured: the last checkpoint
    (every weight, plus AdamW's two fp32 moments per trainable weight) and the student, which for
    LoRA is the merged full model however few weights trained, written at ~200 MB/s, plus 1 s."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 8 * sum(p.numel() for p in trainable)
    return 1.0 + (2 * weights + moments) / 200e6


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


def _save_student(acc, wrapped, tok, out: Path, checkpoint_dir: Path | None = None) -> None:
    """Gather (ZeRO-3 included) and save a `from_pretrained`-loadable student; LoRA is merged.

    A full student is saved in fp32, as trained. Under DeepSpeed bf16/fp16 the module holds only a
    16-bit copy (rounding away the last updates), so the fp32 masters are read from `checkpoint_dir`, the
    DeepSpeed checkpoint just written."""
    model = acc.unwrap_model(wrapped).student
    masters = checkpoint_dir is not None and deepspeed_dtype(acc) in (torch.bfloat16, torch.float16)
    if masters and not hasattr(model, "merge_and_unload"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        acc.wait_for_everyone()
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir)) if acc.is_main_process else {}
    else:
        state = acc.get_state_dict(wrapped)
    if acc.is_main_process:
        state = {k.removeprefix("student."): v for k, v in state.items()}
        if hasattr(model, "merge_and_unload"):
            adapter_dir = out.with_name(out.name + "_adapter")
            tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")  # renamed whole into place, as the student
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            ckpt.seal(tmp)
            shutil.rmtree(adapter_dir, ignore_errors=True)
            os.replace(tmp, adapter_dir)
            merged = copy.deepcopy(model).merge_and_unload()
            save_pretrained(merged, tok, out, seal=True)
        else:
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _record_dtype(tmp / "config.json", state)
            tok.save_pretrained(tmp)
            ckpt.seal(tmp)  # loading the student (eval, publish) checks every file against it
            kill_point("student:saved")  # written under its temporary name, not yet renamed
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    acc.wait_for_everyone()


def _record_dtype(config: Path, state: dict) -> None:
    """config.json's `dtype` (what `from_pretrained` loads by default) as the saved tensors': save_pretrained
    records the module's, which under DeepSpeed is its 16-bit copy, not the fp32 masters saved."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        cfg = json.loads(config.read_text())
        cfg["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_checkpoint(acc, root: Path, step: int, state: dict, keep_last: int) -> Path:
    # A complete checkpoint of this step is this run's (a fresh start clears an earlier run's): saved
    # periodically just before a budget stop, or resumed from at the last step. It is this state, and
    # rewriting it would delete the only complete one (keep_last: 1) for a moment.
    done = ckpt.complete_at(root, step)
    if done is not None:
        return done
    tmp = ckpt.tmp_path(root, step)
    with ckpt.save_guard(f"saving checkpoint {tmp}", root):
        acc.save_state(str(tmp))  # collective under DeepSpeed
        kill_point("checkpoint:saved")  # the reliability tests' SIGKILL: state written, not sealed
        acc.wait_for_everyone()
        final = ckpt.finalize(root, step, state, keep_last) if acc.is_main_process else root / tmp.name[:-4]
    acc.wait_for_everyone()
    return final


@dataclass
class Setup:
    """What the loop needs, built once by `setup_training`."""

    acc: object
    tok: object
    reader: CacheReader
    codec: object  # the cache's codec (and id order), not the recipe's
    targets: object  # np.ndarray [samples]: target tokens per sample
    wrapped: StudentWithLoss  # prepared by accelerate
    step_fn: TrainStep
    plans: B.PlanCache  # the deterministic batch plan (serves the loss normaliser)
    plan_args: tuple
    grouping: dict
    micro_per_epoch: int
    planned: int
    padding: tuple[float, float]
    save_guess: float  # seconds the final checkpoint + student save may take (save_guess_s)


def build_teachers(recipe: Recipe, reader: CacheReader, codec, device) -> Teachers:
    """Cached teachers from the cache, online ones loaded once and run on each micro-batch."""
    sources = [CachedTeachers(codec, reader.cached_names), *load_live_teachers(recipe, codec, device)]
    return Teachers(sources, recipe.teachers, reader.domains, recipe.loss.weighting)


def setup_training(recipe: Recipe, log) -> Setup:
    """Everything the loop needs (the trainer's, and `distill plan --measure`'s few real steps)."""
    t = recipe.train
    acc = build_accelerator(recipe)
    torch.manual_seed(recipe.seed)
    # every hash once, by the main process (the other ranks check sizes, headers and offsets)
    reader = CacheReader(recipe.cache.dir, verify=recipe.cache.verify if acc.is_main_process else "sizes")
    tok = load_tokenizer(recipe.tokenizer or recipe.student.model,
                         gguf_file=None if recipe.tokenizer else recipe.student.gguf_file,
                         trust_remote_code=recipe.trust_remote_code, what="student tokenizer")
    codec = check_cache(reader, recipe, tok)  # the cache's codec (and id order), fitted to the student's vocabulary
    n = len(reader)
    micro_per_epoch = n // (t.batch_size * acc.num_processes)  # full global batches per epoch
    if micro_per_epoch == 0:
        raise DistillError(f"train.batch_size: {t.batch_size} x {acc.num_processes} processes is more than the "
                           f"{n} cached samples")

    plan_args = (n, t.batch_size, acc.num_processes, recipe.seed)
    lengths = reader.lengths()
    grouping = {"lengths": lengths if t.group_by_length else None, "group_batches": t.group_batches}
    plans = B.PlanCache(*plan_args, micro_per_epoch, **grouping)
    padding = (B.padding_fraction(plans.get(0), lengths), B.padding_fraction(B.epoch_plan(*plan_args, 0), lengths))
    planned = t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)
    step_fn, save_guess = build_train_step(recipe, acc, lambda: build_teachers(recipe, reader, codec, acc.device),
                                           planned)
    online = [tt.name for tt in recipe.teachers if tt.online]
    log(f"train: {setup_line(acc)}" + (f"; online teachers: {', '.join(online)}" if online else ""))
    return Setup(acc, tok, reader, codec, reader.row_counts(), step_fn.wrapped, step_fn, plans, plan_args, grouping,
                 micro_per_epoch, planned, padding, save_guess)


def build_train_step(recipe: Recipe, acc, teachers, planned: int) -> tuple[TrainStep, float]:
    """The student as `distill train` trains it, behind its one step: (TrainStep, save guess in s).

    The recipe's student (build_student), wrapped with its loss, AdamW and the LR schedule over
    `planned` steps, prepared by accelerate (the schedule registered for checkpoints); `teachers`
    is a `signals.Teachers`, or a callable making one once the student is placed (live teachers
    then load after it). Benchmarks and tests build their step here too, so they measure the
    trainer's own."""
    t = recipe.train
    student = build_student(recipe, acc.device, deepspeed_dtype(acc))
    wrapped = StudentWithLoss(student, recipe.loss)
    if zero_stage(acc) == 3:
        wrapped.register_head_with_zero3()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    save_guess = save_guess_s(student, params)  # before prepare: ZeRO-3 then partitions the weights
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, t.warmup_steps, planned))
    wrapped, opt = acc.prepare(wrapped, opt)
    acc.register_for_checkpointing(sched)
    teachers = teachers() if callable(teachers) else teachers
    return TrainStep(acc, wrapped, opt, sched, teachers, t.max_grad_norm), save_guess


def _resume(acc, ckpt_root: Path, recipe: Recipe, log) -> tuple[int, int, int]:
    """(step, micro-batches consumed, target tokens seen) of the newest complete checkpoint, loaded."""
    if acc.is_main_process:
        ckpt.clean_tmp(ckpt_root)
    last = ckpt.latest(ckpt_root)
    if last is None:  # a requeued job passes --resume every time: the first time there is nothing yet
        log(f"train: --resume: no complete checkpoint under {ckpt_root} yet; starting from step 0")
        return 0, 0, 0
    ckpt.verify(last)
    ckpt.check_recipe(last, recipe)
    acc.load_state(str(last))
    st = ckpt.read_state(last)
    log(f"resumed from {last} at step {st['step']}")
    return st["step"], st["micro"], st["tokens"]


def micro_batch_iter(recipe: Recipe, s: Setup, micro: int, log):
    """Micro-batches of this rank from micro-batch `micro` on, in plan order."""
    t = recipe.train
    cuda = s.acc.device.type == "cuda"
    workers = t.num_workers if t.num_workers is not None else (2 if cuda else 0)
    # The loader walks the same plan from the resume position with its own PlanCache (it runs
    # ahead of the loop by the prefetch depth).
    sampler = B.MicroBatchSampler(B.PlanCache(*s.plan_args, s.micro_per_epoch, **s.grouping), s.acc.process_index,
                                  start=micro, stop=s.planned * t.grad_accum)
    # On CUDA the compact records go to the device and are decoded there; on CPU workers decode them.
    loader = B.make_loader(B.CacheDataset(s.reader), sampler, s.tok.pad_token_id, workers=workers, pin_memory=cuda,
                           codec=None if cuda or workers == 0 else s.codec)
    log(f"batches: {workers} loader workers per process; padding {s.padding[0]:.1%} of tokens "
        f"({s.padding[1]:.1%} without length grouping)")
    return iter(loader)


def run_train(recipe: Recipe, resume: bool = False, start: float | None = None, log=print) -> TrainResult:
    start = time.time() if start is None else start
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / "checkpoints"
    if not resume:
        _refuse_to_drop_an_unfinished_run(run_dir, ckpt_root)
    s = setup_training(recipe, log)
    acc = s.acc
    pos = _resume(acc, ckpt_root, recipe, log) if resume else (0, 0, 0)
    micro_batches = micro_batch_iter(recipe, s, pos[1], log)
    init_trackers(acc, recipe, run_dir)
    history = run_dir / "train_log.jsonl"
    if acc.is_main_process:
        truncate_history(history, pos[0])  # a fresh start keeps no line; a resume, those up to its checkpoint
        if pos[0] == 0 and ckpt.clear(ckpt_root):
            log(f"train: a fresh start: removed the checkpoints of the finished earlier run in {ckpt_root}")
    budget = Budget(start, recipe.train.budget_minutes, recipe.train.eval_reserve_minutes,
                    save_guess_s=s.save_guess)
    step, micro, tokens_seen, stopped_by, last_loss = _loop(recipe, s, micro_batches, pos, budget, ckpt_root,
                                                            history)
    del micro_batches  # stops the loader workers before the saves
    final_ckpt = save_final(recipe, s, step, micro, tokens_seen)
    wall = time.time() - start
    result = TrainResult(step, s.planned, tokens_seen, stopped_by, wall, last_loss, str(run_dir / "student"),
                         str(final_ckpt), *s.padding)
    if acc.is_main_process:
        (run_dir / "train_result.json").write_text(json.dumps(result.__dict__, indent=1) + "\n")
        log(f"train: {step}/{s.planned} steps ({'stopped by the time budget' if stopped_by == 'budget' else 'done'}"
            f"), {tokens_seen} target tokens, {wall:.1f}s; student saved to {run_dir / 'student'}")
    acc.end_training()
    return result


def _refuse_to_drop_an_unfinished_run(run_dir: Path, ckpt_root: Path) -> None:
    """A fresh start deletes the run directory's checkpoints: refuse it while they are those of a run
    that did not finish (killed, preempted), which `--resume` continues. A finished run's checkpoints
    (its train_result.json names the last) are replaced without asking."""
    last = ckpt.latest(ckpt_root)
    if last is None:
        return
    try:
        finished = Path(json.loads((run_dir / "train_result.json").read_text())["checkpoint"]).name == last.name
    except (OSError, ValueError, KeyError, TypeError):
        finished = False
    if not finished:
        raise DistillError(f"{run_dir} holds an unfinished run (its last checkpoint is {last}): continue it with "
                           f"--resume, or delete {ckpt_root} to start over")


def save_final(recipe: Recipe, s: Setup, step: int, micro: int, tokens_seen: int) -> Path:
    """The final checkpoint (the periodic one of this step when there is one), then the loadable student
    from it; returns the checkpoint."""
    run_dir = Path(recipe.run_dir)
    final_ckpt = _save_checkpoint(s.acc, run_dir / "checkpoints", step,
                                  {"step": step, "micro": micro, "tokens": tokens_seen,
                                   "recipe": ckpt.recipe_identity(recipe)}, recipe.train.keep_last)
    with ckpt.save_guard(f"saving the student to {run_dir / 'student'}", run_dir / "checkpoints"):
        _save_student(s.acc, s.wrapped, s.tok, run_dir / "student", final_ckpt)
    return final_ckpt


def step_norm(s: Setup, micro: int, grad_accum: int) -> int:
    """Target tokens of the optimizer step starting at global micro-batch `micro`, over micro-batches and
    ranks: the same number on every rank, known before the step, so the loss is normalised once."""
    return sum(int(s.targets[s.plans.batch(m)].sum()) for m in range(micro, micro + grad_accum))


def _loop(recipe: Recipe, s: Setup, micro_batches, pos: tuple[int, int, int], budget: Budget, ckpt_root: Path,
          history: Path) -> tuple[int, int, int, str, float | None]:
    """Optimizer steps until the plan or the budget ends: (step, micro, tokens seen, stopped_by, last loss)."""
    t, acc = recipe.train, s.acc
    step, micro, tokens_seen = pos
    bar = progress(total=s.planned, initial=step, desc="train", unit="steps", disable=not acc.is_main_process)
    stopped_by, last_loss = "done", None
    window = new_window()
    while step < s.planned:
        if not _agree(acc, budget.fits_another_step(time.time())):
            stopped_by = "budget"
            break
        t_step = time.time()
        norm = step_norm(s, micro, t.grad_accum)
        try:
            # The step checks loss and gradient norm before its update (one host sync), so
            # every checkpoint on disk holds finite weights.
            out = s.step_fn([next(micro_batches) for _ in range(t.grad_accum)], norm)
        except NonFiniteStep as exc:
            raise DistillError(f"training diverged at step {step + 1}: {exc}; {_kept(ckpt_root)} "
                               "(start a fresh run with a lower train.lr or train.max_grad_norm)") from None
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            raise DistillError(f"out of memory at step {step + 1} with train.batch_size {t.batch_size}: lower it "
                               "(and raise train.grad_accum to keep the global batch; a fresh run), or set "
                               "student.gradient_checkpointing: true or a smaller loss.chunk_size (both can "
                               f"change on --resume); {_kept(ckpt_root)}") from None
        micro += t.grad_accum
        for key in ("loss", "tokens", "div", "share"):
            window[key] = out[key] if window[key] is None else window[key] + out[key]
        step += 1
        tokens_seen += norm  # global target tokens of the step (all ranks)
        budget.step_s.append(time.time() - t_step)
        bar.update(1)
        if step % t.log_every_steps == 0 or step == s.planned:
            last_loss = log_window(acc, bar, window, step, s.step_fn.sched, recipe, history)
        if t.save_every_steps and step % t.save_every_steps == 0 and step < s.planned:
            t0 = time.time()
            _save_checkpoint(acc, ckpt_root, step, {"step": step, "micro": micro, "tokens": tokens_seen,
                                                    "recipe": ckpt.recipe_identity(recipe)}, t.keep_last)
            budget.save_s = max(budget.save_s, 2 * (time.time() - t0))
    bar.close()
    if window["tokens"] is not None:
        last_loss = log_window(acc, bar, window, step, s.step_fn.sched, recipe, history)
    return step, micro, tokens_seen, stopped_by, last_loss


def _kept(ckpt_root: Path) -> str:
    last = ckpt.latest(ckpt_root)
    return f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"


def _agree(acc, flag: bool) -> bool:
    """All ranks take rank 0's decision (clocks differ slightly between processes)."""
    if acc.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    t = torch.tensor([1 if flag else 0], device=acc.device)
    return bool(broadcast(t, from_process=0).item())
