"""Kill anywhere (docs/reliability.md): real `distill cache` and `distill train` processes die by SIGKILL
at seeded moments, then are rerun or resumed; the result equals an uninterrupted run's.

Each seed draws two interruptions: a named kill point (distill/faults.py: inside a teacher-file,
token-file, manifest or checkpoint-file write, after a checkpoint's state is written, after its
rename, after the student is written under its temporary name), or a kill from outside at a random
time. After every kill, what is on disk is checked: an incomplete cache is refused, every
checkpoint that counts verifies, and with keep_last: 1 a complete checkpoint exists from the first
one on. Finally the cache must be byte-identical, and the student's weights equal within 1e-6, to
the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _tiny, tiny_recipe, write_recipe
from distill import checkpoint as ckpt
from distill.cache import manifest as mf
from distill.cache import store
from distill.cache.capture import run_capture
from distill.config import load_recipe
from distill.errors import CacheError
from distill.files import sha256_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(5)
N_SHARDS = 9


def _start(args: list[str], kill_at: str | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("DISTILL_KILL_AT", None)
    if kill_at:
        env["DISTILL_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _interrupt(proc: subprocess.Popen, after: float | None, ready: Path | None = None) -> tuple[int, str]:
    """Wait for `proc`. With `after`: once `ready` exists (the stage has begun its work), SIGKILL its
    process group `after` seconds later, if it is still running."""
    if after is not None:
        deadline = time.monotonic() + 300
        while ready is not None and not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _plan(seed: int, points: list[str], seconds: tuple[float, float]) -> list[tuple[str | None, float | None]]:
    """Two interruptions: the first a kill point or a kill from outside at a random time, the second a
    kill point (so that every seed interrupts at least once)."""
    rng = random.Random(seed)
    first = (rng.choice(points), None) if rng.random() < 0.5 else (None, rng.uniform(*seconds))
    return [first, (rng.choice(points), None)]


# ---------------------------------------------------------------- capture


@pytest.fixture(scope="module")
def capture_world(tiny_world, tmp_path_factory) -> dict:
    """Wider teachers and longer samples (a capture of a few seconds, 9 shards), and the reference cache."""
    root = tmp_path_factory.mktemp("killcache")
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choice("abcdefghij") for _ in range(rng.randint(15, 30))) + "=",
             "response": "".join(rng.choice("klmnop") for _ in range(rng.randint(6, 12)))} for _ in range(240)]
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    world = {**tiny_world, "ta": _tiny(root / "ta", 11, tiny_world["tok"], hidden=96),
             "tb": _tiny(root / "tb", 12, tiny_world["tok"], hidden=96)}

    def recipe(run: Path) -> Path:
        r = tiny_recipe(world, run, cache={"top_k": 8, "batch_size": 16, "shard_tokens": 1000})
        r["data"] = {"sources": [{"path": str(data)}], "max_length": 48}
        return write_recipe(run.parent / f"{run.name}.yaml", r)

    reference = recipe(root / "reference")
    code, out = _interrupt(_start(["cache", str(reference)], None), None)
    assert code == 0, out[-3000:]
    cache = root / "reference" / "cache"
    assert len(mf.read_manifest(cache)["shards"]) == N_SHARDS
    return {"recipe": recipe, "digest": _digest(cache)}


def _digest(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): sha256_file(p) for p in sorted(cache.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


CAPTURE_POINTS = ["write:manifest.json:2", "write:manifest.json:9", "write:id_order.npy:1", "write:input_ids.npy:3",
                  "write:teacher-ta.npy:2", "write:teacher-tb.npy:5", "write:teacher-ta.npy:6"]


@pytest.mark.parametrize("seed", SEEDS)
def test_capture_killed_anywhere_resumes_byte_identical(capture_world, tmp_path, seed):
    path = capture_world["recipe"](tmp_path / "run")
    cache = tmp_path / "run" / "cache"
    kills = 0
    for point, after in _plan(seed, CAPTURE_POINTS, (0.0, 1.5)):
        code, out = _interrupt(_start(["cache", str(path)], point), after, cache / "manifest.json")
        if code == 0:  # finished before the moment: nothing was interrupted
            continue
        assert code == -signal.SIGKILL, out[-3000:]
        kills += 1
        if (cache / "manifest.json").exists():
            m = mf.read_manifest(cache)
            if m["complete"]:  # killed after the last file was recorded (its log lines still to print)
                store.CacheReader(cache, verify="full")
            else:
                with pytest.raises(CacheError, match="incomplete"):
                    store.CacheReader(cache)
            for shard, entry in m["shards"].items():  # the manifest names only finished files
                for fname, rec in entry["files"].items():
                    assert sha256_file(cache / shard / fname) == rec["sha256"], (shard, fname)
    assert kills >= 1, "no interruption landed: the plan or the data is too small"
    code, out = _interrupt(_start(["cache", str(path)], None), None)
    assert code == 0, out[-3000:]
    assert _digest(cache) == capture_world["digest"]
    store.CacheReader(cache, verify="full")


# ---------------------------------------------------------------- training

TRAIN = {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "schedule": "cosine",
         "save_every_steps": 1, "keep_last": 1, "log_every_steps": 1}
TRAIN_POINTS = ["checkpoint:saved:1", "checkpoint:saved:4", "checkpoint:renamed:2", "checkpoint:renamed:5",
                "write:trainer_state.json:3", "write:CHECKSUMS.json:2", "write:CHECKSUMS.json:6", "student:saved:1"]


@pytest.fixture(scope="module")
def train_world(tiny_world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("killtrain")
    path = write_recipe(root / "r.yaml", tiny_recipe(tiny_world, root / "straight", train=TRAIN))
    run_capture(load_recipe(path))
    code, out = _interrupt(_start(["train", str(path)], None), None)
    assert code == 0, out[-3000:]
    from safetensors.torch import load_file

    return {"cache": root / "straight" / "cache", "base": tiny_world,
            "weights": load_file(root / "straight" / "student" / "model.safetensors")}


@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_anywhere_resumes_to_the_same_student(train_world, tmp_path, seed):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(train_world["base"], run, train=TRAIN,
                                                         cache={"dir": str(train_world["cache"]), "top_k": 4}))
    root = run / "checkpoints"
    kills = 0
    for point, after in _plan(seed, TRAIN_POINTS, (0.0, 1.5)):
        resume = ["--resume"] if ckpt.latest(root) is not None else []
        code, out = _interrupt(_start(["train", str(path), *resume], point), after, run / "recipe.resolved.yaml")
        if code == 0:
            continue
        assert code == -signal.SIGKILL, out[-3000:]
        kills += 1
        done = ckpt.list_checkpoints(root)
        for folder in done:
            ckpt.verify(folder)  # every folder that counts as a checkpoint is whole
        first_sealed = point is not None and point not in ("checkpoint:saved:1", "write:trainer_state.json:1",
                                                           "write:CHECKSUMS.json:1")
        if first_sealed:  # keep_last: 1, yet never without a complete checkpoint once one was made
            assert done, (point, sorted(p.name for p in root.iterdir()) if root.exists() else None)
        if point and point.startswith("student:"):
            assert not (run / "student").exists() or (run / "student" / "model.safetensors").is_file()
    assert kills >= 1, "no interruption landed"
    resume = ["--resume"] if ckpt.latest(root) is not None else []
    code, out = _interrupt(_start(["train", str(path), *resume], None), None)
    assert code == 0, out[-3000:]
    assert json.loads((run / "train_result.json").read_text())["steps"] == TRAIN["max_steps"]
    assert not list(root.glob("*.tmp")) and not list(run.glob("*.tmp"))
    got, want = load_file(run / "student" / "model.safetensors"), train_world["weights"]
    assert got.keys() == want.keys() and got
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-6, k
    history = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert history == list(range(1, TRAIN["max_steps"] + 1))


def test_kill_points_are_inert_without_the_variable(tmp_path):
    """Unset (every user run), a kill point does nothing; set, it kills at exactly the n-th call."""
    code = ("from distill.faults import kill_point\n"
            "for i in range(5):\n    kill_point('x')\n    print(i, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_KILL_AT"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 0 and plain.stdout.split() == ["0", "1", "2", "3", "4"]
    killed = subprocess.run([sys.executable, "-c", code], env=dict(env, DISTILL_KILL_AT="x:3"), capture_output=True,
                            text=True, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ["0", "1"]
