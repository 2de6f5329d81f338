"""Teachers behind one interface: a cached teacher and a live one yield the same sparse signal.

A `SignalSource` gives, for one micro-batch, the sparse next-token distributions of its
teachers at the batch's target positions: a `TeacherSignal` with [n, M, k] tensors (n of
its teachers, M target rows in (sample, position) order, k the cache codec's entries).

    CachedTeachers(codec, names)     the cache's records of the batch, decoded
    LiveTeacher(model, teacher, codec)   the model run on the batch: `teacher_topk`, then the
                                     codec's encode + decode, so a live teacher's signal is the
                                     one its cache records would hold (bit for bit, given the
                                     same model and the same batch shapes)
    Teachers(sources, recipe order, weighting)   all teachers of a recipe: one signal in recipe
                                     order and the per-token teacher weights the loss takes

So the loss, the step and the trainer never know where a teacher's signal came from
(STYLE.md pattern 4; the idea follows DistillKit's `SignalSource`, with many teachers).
"""

from __future__ import annotations

from typing import Protocol

import torch

from distill.batches import decode_signal
from distill.cache.capture import teacher_topk
from distill.cache.teachers import Active, groups, load_group
from distill.config import Recipe, TeacherConfig
from distill.loss import TeacherSignal, example_weights


class SignalSource(Protocol):
    names: list[str]  # the teachers this source yields, in its signal's order

    def signal(self, batch: dict, device) -> TeacherSignal:
        """TeacherSignal of `batch` with [len(names), M, k] tensors on `device`."""


class CachedTeachers:
    """The cached teachers of a micro-batch: its "records" [n, M, R] uint8, decoded on `device`,
    or the "signal" a loader worker already decoded (see batches.make_loader)."""

    def __init__(self, codec, names: list[str]):
        self.codec, self.names = codec, list(names)

    def signal(self, batch: dict, device) -> TeacherSignal:
        if "signal" in batch:  # decoded by a loader worker
            return TeacherSignal(*(x.to(device, non_blocking=True) for x in batch["signal"]))
        return decode_signal(self.codec, batch["records"].to(device, non_blocking=True))


class LiveTeacher:
    """One teacher model run on each micro-batch (in eval and inference mode), its top-k put
    through the cache codec's encode and decode: the same signal `distill cache` would store.

    `model` may be a LoRA base shared with sibling teachers; `Active` switches to this one's adapter."""

    def __init__(self, model, teacher: TeacherConfig, codec):
        self.model, self.teacher, self.codec = model, teacher, codec
        self.names = [teacher.name]

    def signal(self, batch: dict, device) -> TeacherSignal:
        ids, attn, select = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask",
                                                                                "select"))
        with torch.inference_mode(), Active(self.model, self.teacher) as m:
            records = self.codec.encode(*teacher_topk(m, ids, attn, select, self.codec.k))
            s = decode_signal(self.codec, records.unsqueeze(0))
        # Out of inference mode: the loss may keep these for its backward.
        return TeacherSignal(s.ids.clone(), s.logprobs.clone(), s.log_residual.clone())


def load_live_teachers(recipe: Recipe, codec, device) -> list[LiveTeacher]:
    """The recipe's online teachers, loaded once per base (LoRA siblings share it), in eval mode."""
    out = []
    for group in groups([t for t in recipe.teachers if t.online]):
        model = load_group(group, recipe, device)
        model.requires_grad_(False)
        out += [LiveTeacher(model, t, codec) for t in group]
    return out


class Teachers:
    """All teachers of a recipe, from any mix of sources, combined in recipe order.

    `signal(batch)` is one TeacherSignal [N, M, k] (N = all teachers, recipe order);
    `token_weights(batch)` the [N, M] weights `distill_loss` takes (recipe weights, routing)."""

    def __init__(self, sources: list[SignalSource], teachers: list[TeacherConfig], domain_names: list[str],
                 weighting: str):
        given = [n for s in sources for n in s.names]
        names = [t.name for t in teachers]
        if sorted(given) != sorted(names):
            raise ValueError(f"signal sources yield teachers {given}, the recipe lists {names}")
        self.sources = [s for s in sources if s.names]
        self.order = [given.index(n) for n in names]  # recipe position -> row of the concatenated signals
        self.weights = [t.weight for t in teachers]
        self.domains = [t.domains for t in teachers]
        self.domain_names = domain_names
        self.weighting = weighting

    def signal(self, batch: dict, device) -> TeacherSignal:
        parts = [s.signal(batch, device) for s in self.sources]
        if len(parts) == 1 and self.order == list(range(len(self.order))):
            return parts[0]
        ids, lp, res = (torch.cat(x)[self.order] for x in zip(*((p.ids, p.logprobs, p.log_residual)
                                                                  for p in parts)))
        return TeacherSignal(ids=ids, logprobs=lp, log_residual=res)

    def token_weights(self, batch: dict, device) -> torch.Tensor:
        """[N, M]: each teacher's weight for each target row, from its sample's domain tag."""
        names = [None if d < 0 else self.domain_names[d] for d in batch["domains"].tolist()]
        ex_w = example_weights(self.weights, self.domains, names, self.weighting).to(device)
        return ex_w[:, batch["row_sample"].to(device)]
