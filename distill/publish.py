"""`distill publish`: the trained student as a complete Hub model folder, and its push.

    distill publish RECIPE_OR_RUN_DIR [key=value ...] [--format merged|adapter] [--dry-run]

Writes <run>/publish/ (never touching <run>/student): safetensors weights, config.json,
generation_config.json, the tokenizer with its chat template, and README.md, the model card
(distill/model_card.py). `publish.format: merged` (the default) is the full model: a full
student as trained, a LoRA student merged into its base (peft's merge_and_unload, which
`distill train` ran when it saved <run>/student). `adapter` is a LoRA student's adapter alone
(adapter_config.json + adapter_model.safetensors, from <run>/student_adapter) with the card's
base_model set to student.model, for peft's `PeftModel.from_pretrained(base, repo)`.

The folder is assembled in <run>/.publish.tmp<pid> and renamed into place when complete, so a
folder named `publish` is always a whole one. Only weights in safetensors are copied (a
pickled .bin is refused).

Then, unless --dry-run, huggingface_hub pushes the folder: create_repo(publish.repo_id,
private=publish.private, exist_ok) (an existing repo keeps its visibility), create_branch when
publish.revision names a branch other than main, and one upload_folder commit with
publish.commit_message. The token comes from huggingface_hub's usual places (HF_TOKEN, the
`hf auth login` file); distill never passes, prints or writes it, and scrubs it from errors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distill.config import Recipe
from distill.errors import DistillError
from distill.checkpoint import verify_if_sealed
from distill.model_card import build_card
from distill.secrets import scrub

FOLDER = "publish"
# What a model folder may hold: weights in safetensors only; configs, tokenizer files, the chat
# template. Anything else in the student folder (a pickled .bin, a stray file) is left behind.
KEEP_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _copy_kept(src: Path, dst: Path, skip=lambda name: False) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in KEEP_SUFFIXES and f.name != "CHECKSUMS.json" and not skip(f.name):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _refuse_pickles(folder: Path, what: str) -> None:
    pickled = [f.name for f in folder.iterdir() if f.suffix in PICKLED]
    if pickled and not any(f.suffix == ".safetensors" for f in folder.iterdir()):
        raise DistillError(f"publish: {what} {folder} holds pickled weights only ({', '.join(pickled)}); "
                           "distill publishes safetensors only")


def _stage_merged(student: Path, tmp: Path) -> None:
    verify_if_sealed(student, "student")  # a damaged student is named, never published
    _refuse_pickles(student, "the student")
    _copy_kept(student, tmp)
    if not list(tmp.glob("*.safetensors")):
        raise DistillError(f"publish: no safetensors weights in {student}")
    if not (tmp / "generation_config.json").exists():  # older saves: derive it from the model config
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp)).save_pretrained(tmp)


def _stage_adapter(student: Path, adapter: Path, tmp: Path) -> None:
    if not all((adapter / f).is_file() for f in ADAPTER_FILES):
        raise DistillError(f"publish.format: adapter: no saved adapter at {adapter} ({' + '.join(ADAPTER_FILES)}); "
                           "train the LoRA student with `distill train` first")
    verify_if_sealed(adapter, "student adapter")
    for f in ADAPTER_FILES:
        shutil.copy2(adapter / f, tmp / f)
    # The tokenizer and generation settings the student was trained and saved with; not its full config or weights.
    _copy_kept(student, tmp, skip=lambda n: n == "config.json" or n.endswith(".safetensors") or n.startswith("model."))


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`: the old folder is moved aside first, then dropped."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(recipe: Recipe, log=print) -> Path:
    """Assemble <run>/publish/ (format publish.format) with its model card; returns its path."""
    run = Path(recipe.run_dir)
    student, fmt = run / "student", recipe.publish.format
    if not (student / "config.json").is_file():
        raise DistillError(f"publish: no trained student at {student}; run `distill train` first")
    for stale in run.glob(f".{FOLDER}.tmp*"):  # a killed publish's leftovers are never taken for a folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run / f".{FOLDER}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        if fmt == "adapter":
            _stage_adapter(student, run / "student_adapter", tmp)
        else:
            _stage_merged(student, tmp)
        build_card(recipe, fmt, chat_template=_has_chat_template(tmp)).save(tmp / "README.md")
        out = run / FOLDER
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"publish: {fmt} model folder written to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out


def push(recipe: Recipe, folder: Path, log=print) -> str:
    """Upload `folder` to publish.repo_id; returns the commit URL. Only the network calls need the Hub."""
    from huggingface_hub import HfApi, get_token

    p = recipe.publish
    if not p.repo_id:
        raise DistillError("publish.repo_id: required to publish (e.g. your-name/my-student); or use --dry-run")
    if not get_token():
        raise DistillError("publish: no Hugging Face token (set HF_TOKEN or run `hf auth login`); or use --dry-run")
    api = HfApi()  # reads the token itself: distill never holds it
    branch = p.revision if p.revision not in (None, "main") else None
    message = p.commit_message or f"distill: {recipe.name}"
    try:
        api.create_repo(p.repo_id, private=p.private, exist_ok=True, repo_type="model")
        if branch:
            api.create_branch(p.repo_id, branch=branch, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=p.repo_id, repo_type="model",
                                 revision=branch, commit_message=message)
    except Exception as exc:  # network and auth errors: one line, scrubbed of any credential
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DistillError(scrub(f"publish: upload to {p.repo_id} failed ({type(exc).__name__}: {first})")) from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{p.repo_id}"
    log(f"publish: pushed {folder} to {p.repo_id}" + (f" (branch {branch})" if branch else "") + f": {url}")
    return url


def publish_student(recipe: Recipe, dry_run: bool = False, log=print) -> str:
    """Write <run>/publish/ and, unless `dry_run`, push it. Returns the folder (dry run) or the commit URL."""
    if not dry_run and not recipe.publish.repo_id:  # before any copying: nothing to push to
        raise DistillError("publish.repo_id: required to publish (e.g. your-name/my-student); or use --dry-run")
    folder = write_folder(recipe, log)
    if dry_run:
        log(f"publish: dry run; nothing uploaded (would push to {recipe.publish.repo_id or '<publish.repo_id unset>'})")
        return str(folder)
    return push(recipe, folder, log)
