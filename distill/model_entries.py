"""Which models `distill eval` scores, and how each is loaded (lazily, one at a time)."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.content_hash import model_fingerprint
from distill.errors import DistillError
from distill.evaluation import ModelEntry
from distill.models import load_model, load_tokenizer


def model_entry(name: str, recipe: Recipe, model: str, adapter: str | None = None, gguf_file: str | None = None,
                revision: str | None = None) -> ModelEntry:
    def load():
        m = load_model(model, revision=revision, gguf_file=gguf_file, adapter=adapter,
                       trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle,
                       what=f"eval model {name}")
        tok = load_tokenizer(model, revision=revision, gguf_file=gguf_file,
                             trust_remote_code=recipe.trust_remote_code, what=f"eval model {name}")
        return m.eval(), tok

    def fingerprint(hashes):
        return model_fingerprint(model, revision=revision, adapter=adapter, gguf_file=gguf_file, hashes=hashes)
    return ModelEntry(name=name, load=load, fingerprint=fingerprint)


def eval_entries(recipe: Recipe, log=print) -> list[ModelEntry]:
    """Student, teachers, extra models and merge baselines, in the recipe's order."""
    from distill.merge import merge_experts

    run = Path(recipe.run_dir)
    entries = []
    for m in recipe.eval.models:
        if m.merge:
            path = merge_experts(recipe, m, run / "baselines" / m.name, log)
            entries.append(model_entry(m.name, recipe, str(path)))
        else:
            entries.append(model_entry(m.name, recipe, m.model, m.adapter, m.gguf_file))
    if recipe.eval.teachers:
        for t in recipe.teachers:
            entries.append(model_entry(t.name, recipe, t.model, t.adapter, t.gguf_file, t.revision))
    if recipe.eval.student:
        student = run / "student"
        if not (student / "config.json").exists():
            raise DistillError(f"eval.student: no trained student at {student}; run `distill train` first "
                               "(or set eval.student=false)")
        entries.append(model_entry("student", recipe, str(student)))
    return entries
