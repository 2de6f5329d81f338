"""`distill publish`: push the trained student and a model card to the Hugging Face Hub.

Only when asked: `publish.push: true` in the recipe (or `distill publish` itself);
`--dry-run` writes the card into <run>/student/README.md and uploads nothing.
The Hub token is read by huggingface_hub from its usual places (HF_TOKEN, the
login cache) and never printed, logged, or written into the card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from distill.config import Recipe, recipe_dict
from distill.errors import DistillError


def _is_hub_id(ref: str) -> bool:
    return not os.path.exists(os.path.expanduser(ref)) and ref.count("/") == 1 and not ref.startswith((".", "/", "~"))


def model_card(recipe: Recipe) -> str:
    run = Path(recipe.run_dir)
    meta = {"library_name": "transformers", "tags": ["distill", "knowledge-distillation", "model-merging"]}
    if _is_hub_id(recipe.student.model):
        meta["base_model"] = recipe.student.model
    teachers = "\n".join(
        f"- **{t.name}**: `{t.model}`" + (f" + LoRA `{t.adapter}`" if t.adapter else "")
        + (f" (domains: {', '.join(t.domains)})" if t.domains else "") + f", weight {t.weight}"
        for t in recipe.teachers)
    lo = recipe.loss
    parts = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {recipe.publish.repo_id or recipe.name}", "",
        f"A student distilled from {len(recipe.teachers)} expert models with "
        "[distill](https://github.com/) (multi-teacher knowledge distillation from a sparse logit cache).", "",
        f"Student initialised from `{recipe.student.model}`" + (" with LoRA" if recipe.student.lora else "") + ".", "",
        "## Teachers", "", teachers, "",
        "## Training", "",
        f"Loss: {lo.divergence}, temperature {lo.temperature}, teacher weighting `{lo.weighting}`, "
        f"CE mix {lo.ce_weight}; up to {recipe.cache.top_k} teacher tokens per position ({recipe.cache.codec} codec).",
    ]
    result = run / "train_result.json"
    if result.exists():
        r = json.loads(result.read_text())
        parts.append(f"Ran {r['steps']}/{r['planned_steps']} optimizer steps over {r['tokens']} target tokens "
                     f"in {r['wall_s'] / 60:.1f} min (stopped: {r['stopped_by']}).")
    report = run / "report.md"
    if report.exists():
        # The tables only: the plots stay in the run dir (not uploaded), and the recipe follows below.
        body = report.read_text().split("\n", 1)[1].split("\n## Run")[0]
        body = "\n".join(ln for ln in body.splitlines() if not ln.startswith("![")).strip()
        parts += ["", "## Evaluation", "", body]
    parts += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe_dict(recipe), sort_keys=False).strip(), "```", ""]
    return "\n".join(parts)


def publish_student(recipe: Recipe, dry_run: bool = False, log=print) -> str:
    student = Path(recipe.run_dir) / "student"
    if not (student / "config.json").exists():
        raise DistillError(f"publish: no trained student at {student}; run `distill train` first")
    repo_id = recipe.publish.repo_id
    if not repo_id and not dry_run:
        raise DistillError("publish.repo_id: required to publish (e.g. your-name/my-student)")
    card = model_card(recipe)
    (student / "README.md").write_text(card)
    if dry_run:
        log(f"publish: dry run, model card written to {student / 'README.md'}; nothing uploaded")
        return str(student / "README.md")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=recipe.publish.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(student), repo_id=repo_id, repo_type="model",
                                 commit_message=f"distill: {recipe.name}")
    except Exception as exc:  # network/auth errors: one line, without the token
        raise DistillError(f"publish: upload to {repo_id} failed ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"publish: pushed {student} to {repo_id} ({url})")
    return url
