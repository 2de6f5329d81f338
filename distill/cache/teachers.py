"""Teacher models for capture and generation: grouped by base, loaded once, adapters switched.

Teachers that share one base model (same weights, dtype, quantization) form a group.
A group's base is loaded once with every LoRA adapter of the group attached by teacher
name (never merged); `Active(model, t)` runs it as one teacher. `GroupLoader` keeps the
last group loaded, so the generation step and the capture that follows it can share
one load of the same base.
"""

from __future__ import annotations

import torch

from distill.config import Recipe, TeacherConfig
from distill.models import attach_adapter, load_model


def group_key(t: TeacherConfig) -> tuple:
    return (t.model, t.revision, t.gguf_file, t.dtype, t.quantization)


def groups(teachers: list[TeacherConfig]) -> list[list[TeacherConfig]]:
    """Teachers sharing one base model form one group (recipe order within and across groups)."""
    out: dict[tuple, list[TeacherConfig]] = {}
    for t in teachers:
        out.setdefault(group_key(t), []).append(t)
    return list(out.values())


def load_group(group: list[TeacherConfig], recipe: Recipe, device):
    """Load the shared base once and attach every LoRA adapter of the group by teacher name."""
    first = group[0]
    model = load_model(first.model, revision=first.revision, gguf_file=first.gguf_file, dtype=first.dtype,
                       quantization=first.quantization, trust_remote_code=recipe.trust_remote_code,
                       allow_pickle=recipe.allow_pickle, device=device, what=f"teacher {first.name}")
    for t in group:
        if t.adapter:
            model = attach_adapter(model, t.adapter, name=t.name, what=f"teacher {t.name} adapter",
                                   allow_pickle=recipe.allow_pickle)
    model.eval()
    return model


class Active:
    """Context: run `model` as teacher `t` (its adapter active, or all adapters off)."""

    def __init__(self, model, t: TeacherConfig):
        self.model, self.t, self._ctx = model, t, None

    def __enter__(self):
        if self.t.adapter:
            self.model.set_adapter(self.t.name)
        elif hasattr(self.model, "disable_adapter"):
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
        return self.model

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


class GroupLoader:
    """Loads one group at a time and keeps it until another is asked for (or `release`)."""

    def __init__(self, recipe: Recipe, device):
        self.recipe, self.device = recipe, device
        self.key: tuple | None = None
        self.model = None
        self.loads = 0  # full-model loads so far

    def get(self, group: list[TeacherConfig]):
        if self.key != group_key(group[0]):
            self.release()
            self.model = load_group(group, self.recipe, self.device)
            self.key = group_key(group[0])
            self.loads += 1
        return self.model

    def holds(self, group: list[TeacherConfig]) -> bool:
        return self.key == group_key(group[0])

    def release(self) -> None:
        if self.model is not None:
            self.model, self.key = None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
