"""The training log: `<run>/train_log.jsonl` (one JSON line per logged step) and the W&B run.

Each logged line holds step, loss (per target token, over the window since the last line), lr,
tokens_per_s, and div/<teacher>, share/<teacher> (each teacher's divergence and its share of the
loss weight). A resumed run first drops the lines past its checkpoint, a fresh start all of them,
so that the file holds each step once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from distill.config import Recipe, recipe_dict
from distill.secrets import redact


def init_trackers(acc, recipe: Recipe, run_dir: Path) -> None:
    if recipe.wandb.enabled:
        init = {"mode": recipe.wandb.mode, "dir": str(run_dir), "name": recipe.wandb.run_name or recipe.name}
        if recipe.wandb.entity:
            init["entity"] = recipe.wandb.entity
        acc.init_trackers(recipe.wandb.project, config=redact(recipe_dict(recipe)), init_kwargs={"wandb": redact(init)})


def truncate_history(history: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from: a killed run logged steps it will redo."""
    if not history.exists():
        return
    lines = [x for x in history.read_text().splitlines() if _logged_step(x) <= step]
    tmp = history.with_name(history.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, history)


def _logged_step(line: str) -> float:
    """The step of a log line; a line torn by a kill mid-append counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def new_window() -> dict:
    return {"loss": None, "tokens": None, "div": None, "share": None, "t0": time.time()}


def log_window(acc, bar, window: dict, step: int, sched, recipe: Recipe, history: Path) -> float | None:
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
    window.update(new_window())
    return metrics["loss"]
