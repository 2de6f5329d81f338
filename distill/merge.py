"""Merging baselines: the uniform weight average of several teachers.

A LoRA teacher is merged into its base first, so averaging LoRA experts equals the
base plus the mean of their deltas. Teachers are loaded one at a time and summed
in float32, so memory holds one model plus one running sum.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import Recipe, TeacherConfig
from distill.errors import DistillError
from distill.models import load_model, load_tokenizer, save_pretrained


def _materialise(t: TeacherConfig, recipe: Recipe):
    model = load_model(t.model, revision=t.revision, gguf_file=t.gguf_file, dtype="float32",
                       adapter=t.adapter, trust_remote_code=recipe.trust_remote_code, what=f"teacher {t.name}")
    if t.adapter:
        model = model.merge_and_unload()
    return model


def uniform_average(recipe: Recipe, names: list[str], out: Path, log=print) -> Path:
    """Average the named teachers' weights into `out` (reused when already there)."""
    if (out / "config.json").exists():
        return out
    teachers = {t.name: t for t in recipe.teachers}
    total: dict[str, torch.Tensor] | None = None
    model = None
    for name in names:
        model = _materialise(teachers[name], recipe)
        state = model.state_dict()
        if total is None:
            total = {k: v.detach().float().clone() for k, v in state.items()}
        else:
            if state.keys() != total.keys():
                raise DistillError(f"eval.models: cannot average {names}: teacher {name} has other parameters")
            for k, v in state.items():
                total[k] += v.detach().float()
    assert total is not None and model is not None
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: (v / len(names)).to(dtype) for k, v in total.items()})
    first = teachers[names[0]]
    tok = load_tokenizer(first.model, revision=first.revision, gguf_file=first.gguf_file,
                         trust_remote_code=recipe.trust_remote_code)
    save_pretrained(model, tok, out)
    log(f"merge: uniform average of {', '.join(names)} -> {out}")
    return out
