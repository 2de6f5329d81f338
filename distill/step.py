"""One optimizer step of distillation: the function `distill train` and every benchmark call.

    step = TrainStep(acc, wrapped, opt, sched, teachers, max_grad_norm)
    metrics = step(micro_batches, norm)

`wrapped` is a `StudentWithLoss` prepared by accelerate (with `opt`); `teachers` a
`signals.Teachers` (cached, live or both); `micro_batches` the step's
`acc.gradient_accumulation_steps` collated micro-batches of this rank; `norm` the number of
target tokens of the whole step over micro-batches and ranks. The step runs forward + loss and
backward on each micro-batch, then checks that the loss and the gradient norm are finite on
every rank, and only then clips and updates. A non-finite step raises `NonFiniteStep` with the
weights untouched, on every launch type:

- one process / DDP: gradients accumulate, `clip_grad_norm_` gives the norm, the check runs,
  then `opt.step()`.
- DeepSpeed: accelerate's `backward` would call `engine.step()` inside the last micro-batch's
  backward (before any check). The step calls `engine.backward` itself (same accumulation
  boundary, same 1/grad_accum scaling) and `engine.step()` after checking the loss. The
  gradient norm is the engine's own, taken inside `engine.step()` before its update: ZeRO
  skips the update when that norm is not finite (fp32, and bf16 with
  `bf16.check_grad_overflow`, which `train.build_accelerator` sets), so a non-finite gradient
  costs no update either, and the step then raises.

Metrics are device tensors summed over the step's micro-batches (no host sync per
micro-batch; the finiteness check is the one sync per step).
"""

from __future__ import annotations

import torch

from distill.errors import DistillError
from distill.logits import logit_transform
from distill.loss import TeacherSignal, distill_loss


class StudentWithLoss(torch.nn.Module):
    """Student forward + chunked multi-teacher loss, as one module for DDP/DeepSpeed."""

    def __init__(self, student, loss_cfg):
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg
        self.config = student.config  # DeepSpeed's "auto" bucket sizes are read from model.config.hidden_size
        self.logit_transform = logit_transform(student)  # what the student does after its head (Gemma 2 softcap...)

    def forward(self, input_ids, attention_mask, select, targets, signal: TeacherSignal, token_weights):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           logits_to_keep=1, use_cache=False)
        # hidden[:, t] predicts token t+1; keep only positions whose next token is a target.
        hidden = out.hidden_states[-1][:, :-1][select]
        head = self.student.get_output_embeddings()
        # Each selected row's sample, in hidden's order (the batch's row_sample): min_ce_sequence ranks per sample.
        row_sample = torch.arange(select.shape[0], device=select.device)[:, None].expand_as(select)[select]
        res = distill_loss(hidden, head.weight, getattr(head, "bias", None), signal, targets, token_weights,
                           self.loss_cfg, logit_transform=self.logit_transform, sequence_index=row_sample)
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


class NonFiniteStep(DistillError):
    """The step's loss or gradient norm was not finite on some rank; no update was made."""


class TrainStep:
    """One optimizer step over explicit state (see the module docstring)."""

    def __init__(self, acc, wrapped, opt, sched, teachers, max_grad_norm: float):
        self.acc, self.wrapped, self.opt, self.sched = acc, wrapped, opt, sched
        self.teachers = teachers
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        ds = getattr(acc, "deepspeed_engine_wrapped", None)
        self.engine = ds.engine if ds is not None else None
        self.fp16 = acc.mixed_precision == "fp16"

    def __call__(self, micro_batches: list[dict], norm: int) -> dict:
        """Returns device tensors: loss_sum (0-dim) and loss [1] (this rank's token-loss sum),
        tokens [1] (its target tokens), div [N] and share [N] (per-teacher sums), grad_norm
        (0-dim, also without clipping). Raises NonFiniteStep before any update."""
        acc = self.acc
        if len(micro_batches) != acc.gradient_accumulation_steps:
            raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps "
                             f"{acc.gradient_accumulation_steps}")
        # accelerate divides by grad_accum (DeepSpeed's engine does the same) and DDP/DeepSpeed
        # average over ranks: undo both, so the gradient is exactly
        # sum(token losses) / (global target tokens of the step).
        scale = acc.num_processes * acc.gradient_accumulation_steps / max(norm, 1)
        metrics: dict = {}
        for batch in micro_batches:
            out = self._forward_backward(batch, scale)
            for key, value in out.items():
                metrics[key] = value if key not in metrics else metrics[key] + value
        metrics["loss_sum"] = metrics["loss"].reshape(())
        if self.engine is not None:
            return self._deepspeed_update(metrics)
        # Without clipping the norm is still taken (an infinite max_norm scales nothing), so a
        # non-finite gradient behind a finite loss is caught too.
        grad_norm = acc.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        if self.fp16:
            # fp16 loss scaling: an overflowing step is normal, and the GradScaler inside opt.step()
            # skips it (and lowers the scale); only a non-finite loss means divergence.
            self._check_finite(metrics["loss_sum"])
        else:
            self._check_finite(metrics["loss_sum"] + grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        metrics["grad_norm"] = grad_norm
        return metrics

    def _forward_backward(self, batch: dict, scale: float) -> dict:
        acc, dev = self.acc, self.acc.device
        signal = self.teachers.signal(batch, dev)
        token_w = self.teachers.token_weights(batch, dev)
        with acc.accumulate(self.wrapped):
            out = self.wrapped(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                               batch["select"].to(dev), batch["targets"].to(dev), signal, token_w)
            loss = out["loss_sum"] * scale
            if self.engine is None:
                acc.backward(loss)
            else:  # accelerate's backward would also step the engine at the boundary; we step after the check
                self.engine.set_gradient_accumulation_boundary(is_boundary=acc.sync_gradients)
                self.engine.backward(loss)
        loss_sum = out["loss_sum"].detach().float().reshape(1)
        return {"loss": loss_sum, "tokens": torch.tensor([float(out["n_tokens"])], device=dev),
                "div": out["div"].detach().float(), "share": out["share"].detach().float()}

    def _deepspeed_update(self, metrics: dict) -> dict:
        try:
            self._check_finite(metrics["loss_sum"])
        except NonFiniteStep:
            self.engine.zero_grad()  # (the engine holds this step's accumulated gradients)
            raise
        self.engine.step()  # clips with the engine's own norm; skips the update if that is not finite
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32,
                                    device=self.acc.device).reshape(())
        if norm is not None and not self.fp16:  # fp16: the engine's loss scaler skipped an overflow step
            self._check_finite(grad_norm)  # equal on every rank (the engine reduced it)
        self.sched.step()
        metrics["grad_norm"] = grad_norm
        return metrics

    def _check_finite(self, value: torch.Tensor) -> None:
        """Raise on every rank together when any rank's value is not finite (one host sync)."""
        value = torch.as_tensor(value, dtype=torch.float32, device=self.acc.device).reshape(1)
        if self.acc.num_processes > 1:
            value = self.acc.reduce(value, reduction="sum")  # a NaN or inf anywhere reaches every rank
        if not bool(torch.isfinite(value).all()):
            self.opt.zero_grad(set_to_none=True)
            raise NonFiniteStep("non-finite loss or gradient norm")
