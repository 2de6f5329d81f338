"""Training checkpoints: atomic, verified, keep-last-N.

A checkpoint is `<run>/checkpoints/step-00000100/`, holding accelerate's
`save_state` output (model, optimizer, scheduler, RNG states of every rank),
`trainer_state.json` (step, epoch, micro-batch position, tokens seen) and
`CHECKSUMS.json` (size and sha256 of every file), written last. The folder is
assembled under a temporary name and renamed, so a kill at any moment leaves
either a complete checkpoint or a `.tmp` folder that is ignored and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from distill.files import disk_full, sha256_file, write_json_atomic
from distill.errors import DistillError
from distill.faults import kill_point

PREFIX = "step-"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "CHECKSUMS.json")


def seal(folder: Path) -> None:
    """Write CHECKSUMS.json for every file in `folder`."""
    sums = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(folder)}
    write_json_atomic(folder / "CHECKSUMS.json", sums)


def verify(folder: Path, what: str = "checkpoint") -> None:
    """Raise DistillError naming the first missing, truncated or corrupt file of a sealed folder (a
    checkpoint; `what` = "student" for a student folder, sealed the same way)."""
    sums_path = folder / "CHECKSUMS.json"
    if not sums_path.is_file():
        raise DistillError(f"{folder}: not a complete {what} (CHECKSUMS.json missing)")
    try:
        sums = json.loads(sums_path.read_text())
        ok = isinstance(sums, dict) and all(
            isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts
            and isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)
            for rel, rec in sums.items())
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise DistillError(f"{sums_path}: corrupt checksum list (not {{relative path: {{bytes, sha256}}}} JSON)")
    on_disk = {str(p.relative_to(folder)) for p in _files(folder)}
    for rel, rec in sorted(sums.items()):
        p = folder / rel
        if not p.is_file():
            raise DistillError(f"{p}: missing from the {what} (its CHECKSUMS.json lists it)")
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise DistillError(f"{p}: corrupt {what} file (size or sha256 differs from its CHECKSUMS.json)")
    extra = sorted(on_disk - set(sums))
    if extra:  # a file the folder did not have when sealed (or a CHECKSUMS.json that lost entries)
        raise DistillError(f"{folder / extra[0]}: not in the {what}'s CHECKSUMS.json (added later, or a corrupt "
                           "checksum list)")


def verify_if_sealed(folder: Path, what: str) -> None:
    """`verify` a model folder that distill sealed (a trained student); other folders pass."""
    if (Path(folder) / "CHECKSUMS.json").is_file():
        verify(Path(folder), what)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(".tmp") and (p / "CHECKSUMS.json").exists())


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def complete_at(root: Path, step: int) -> Path | None:
    """The complete checkpoint of `step`, if there is one."""
    folder = root / f"{PREFIX}{step:08d}"
    return folder if folder in list_checkpoints(root) else None


def tmp_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}.tmp"


def finalize(root: Path, step: int, state: dict, keep_last: int) -> Path:
    """Main process only: write the trainer state, seal, rename into place, prune old ones."""
    tmp = tmp_path(root, step)
    write_json_atomic(tmp / "trainer_state.json", state)
    seal(tmp)
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    kill_point("checkpoint:renamed")  # the new checkpoint in place, the old ones still there
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clear(root: Path) -> int:
    """Remove every checkpoint (complete or not) under `root`, for a run that starts afresh; returns how
    many complete ones there were."""
    found = list_checkpoints(root)
    if root.is_dir():
        for p in root.glob(f"{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
    return len(found)


def clean_tmp(root: Path) -> None:
    if root.is_dir():
        for p in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def read_state(folder: Path) -> dict:
    """The trainer state of a verified checkpoint (its hash already checked)."""
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DistillError(f"{path}: unreadable trainer state ({str(exc)[:80]})") from None
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "micro", "tokens"))):
        raise DistillError(f"{path}: not a trainer state ({{step, micro, tokens}})")
    return state


# What a run may change between a checkpoint and its resume: when and how long to train, how often to
# save and log, loader processes. Everything else of the recipe shapes the weights or the batch order.
RESUMABLE_TRAIN_KEYS = ("max_steps", "epochs", "budget_minutes", "eval_reserve_minutes", "save_every_steps",
                        "keep_last", "log_every_steps", "num_workers")
# ... and the memory knobs that leave the weights as they are (what an out-of-memory error suggests)
RESUMABLE_KEYS = {"student": ("gradient_checkpointing",), "loss": ("chunk_size",)}


def recipe_identity(recipe) -> dict:
    """The recipe part `trainer_state.json` records ("recipe") and a resume must match."""
    from distill.config import recipe_dict

    from distill.secrets import redact

    d = recipe_dict(recipe)
    keep = lambda section, free: {k: v for k, v in d[section].items() if k not in free}  # noqa: E731
    ident = {"seed": d["seed"], "student": keep("student", RESUMABLE_KEYS["student"]), "teachers": d["teachers"],
             "data": d["data"], "loss": keep("loss", RESUMABLE_KEYS["loss"]),
             "train": keep("train", RESUMABLE_TRAIN_KEYS)}
    return json.loads(json.dumps(redact(ident)))  # as trainer_state.json holds it (lists, no credential)


def check_recipe(folder: Path, recipe) -> None:
    """Refuse to resume `folder` under a recipe other than the one it was written by, naming the first
    differing key. Checkpoints from before the record are resumed as they are."""
    from distill.cache.manifest import difference

    state = read_state(folder)
    if "recipe" in state:
        diff = difference(state["recipe"], recipe_identity(recipe), what="checkpoint")
        if diff:
            raise DistillError(f"--resume: {folder} is a checkpoint of another recipe: {diff} (resume with the "
                               "recipe it was made with, or train into a new run_dir)")


@contextmanager
def save_guard(what: str, root: Path):
    """A save that fails for want of disk space becomes one line naming the last complete checkpoint
    (the unfinished one is a `.tmp` folder that no resume reads)."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        last = latest(root)
        kept = f"the last complete checkpoint is {last}" if last else "no checkpoint is complete yet"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DistillError(f"{what}: out of disk space or over the file size limit ({first}); {kept}; free space "
                           "and rerun with --resume") from None
