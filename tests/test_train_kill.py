"""`distill train` killed with SIGKILL mid-run, then `--resume`d: the same student as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill import checkpoint as ckpt
from distill.cache.capture import run_capture
from distill.config import load_recipe

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")


def _train(path: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", "train", str(path), *args], cwd=path.parent, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_after_a_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 300) -> bool:
    """SIGKILL the run (its loader workers included) once a complete checkpoint exists, preferably
    while the next one is still being written. Returns whether a `.tmp` folder was caught."""
    deadline = time.time() + timeout
    complete_at = None
    while time.time() < deadline and proc.poll() is None:
        done = ckpt.list_checkpoints(root)
        if done and complete_at is None:
            complete_at = time.time()
        caught = bool(done) and any(root.glob("*.tmp"))
        if caught or len(done) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return caught
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint to kill after (exit code {proc.poll()}): {proc.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_world, tmp_path):
    from safetensors.torch import load_file

    train = {"max_steps": 14, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "schedule": "cosine",
             "save_every_steps": 2, "keep_last": 3, "log_every_steps": 1, "num_workers": 2}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "cached", train=train))
    run_capture(load_recipe(path))
    cache = f"cache.dir={tmp_path / 'cached' / 'cache'}"

    # Uninterrupted, reading in-process (no workers): workers must not change the result either.
    _finish(_train(path, cache, f"run_dir={tmp_path / 'straight'}", "train.num_workers=0"))

    killed = tmp_path / "killed"
    root = killed / "checkpoints"
    proc = _train(path, cache, f"run_dir={killed}", start_new_session=True)
    caught_tmp = _kill_after_a_checkpoint(proc, root)
    assert not (killed / "student").exists()  # it really died before the end
    last = ckpt.latest(root)
    assert last is not None
    last_step = ckpt.read_state(last)["step"]
    assert 0 < last_step < train["max_steps"]
    # A folder still under its temporary name is never a checkpoint, however complete it looks.
    assert caught_tmp == bool(list(root.glob("*.tmp")))
    decoy = root / f"{ckpt.PREFIX}{99:08d}.tmp"
    shutil.copytree(last, decoy)
    (decoy / "trainer_state.json").write_text(json.dumps({"step": 99, "micro": 99, "tokens": 0}))
    ckpt.seal(decoy)

    out = _finish(_train(path, cache, f"run_dir={killed}", "--resume"))
    assert f"resumed from {last} at step {last_step}" in out, out[-3000:]
    assert not list(root.glob("*.tmp"))
    assert json.loads((killed / "train_result.json").read_text())["steps"] == train["max_steps"]
    # The log holds each step once (steps the killed run logged past its checkpoint were dropped),
    # and the resumed run's losses are the uninterrupted run's.
    logged = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == list(range(1, train["max_steps"] + 1))
    reference = [json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(logged, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a, b)

    straight = load_file(tmp_path / "straight" / "student" / "model.safetensors")
    again = load_file(killed / "student" / "model.safetensors")
    base = load_file(Path(tiny_world["base"]) / "model.safetensors")
    assert straight.keys() == again.keys() and straight
    for k in straight:
        assert not torch.equal(straight[k], base[k]), k  # it trained
        assert (straight[k] - again[k]).abs().max().item() <= 1e-6, k
