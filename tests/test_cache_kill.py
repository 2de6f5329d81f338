"""A capture killed with SIGKILL mid-way resumes to a cache byte-identical to an uninterrupted one.

Real subprocesses (`python -m distill cache`), a real kill: no simulated interruption.
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
from distill.files import sha256_file
from distill.cache import store
from distill.cache import manifest as mf
from distill.cli import main
from distill.errors import CacheError

N_SAMPLES = 640  # ~30k tokens: seconds of teacher forwards, so the kill lands mid-capture
SHARD_TOKENS = 4000  # -> 8 shards


@pytest.fixture(scope="module")
def kill_world(tiny_world, tmp_path_factory) -> dict:
    """Two wider teachers and long calibration samples, so a capture takes seconds, not milliseconds."""
    root = tmp_path_factory.mktemp("kill")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"prompt": "".join(rng.choice(letters) for _ in range(rng.randint(20, 40))) + "=",
             "response": "".join(rng.choice(letters) for _ in range(rng.randint(8, 20)))}
            for _ in range(N_SAMPLES)]
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_world["tok"]
    return {**tiny_world, "data": data, "ta": _tiny(root / "ta", 11, tok, hidden=128),
            "tb": _tiny(root / "tb", 12, tok, hidden=128)}


def _recipe(world: dict, tmp_path: Path, run: str) -> Path:
    recipe = tiny_recipe(world, tmp_path / run,
                         cache={"top_k": 8, "batch_size": 16, "shard_tokens": SHARD_TOKENS})
    recipe["data"] = {"sources": [{"path": str(world["data"])}], "max_length": 64}
    return write_recipe(tmp_path / f"{run}.yaml", recipe)


def _start(recipe: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same kernels in every run
    with open(log, "w") as out:  # a file, not a pipe: an unread pipe would stall the child
        return subprocess.Popen([sys.executable, "-m", "distill", "cache", str(recipe)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=recipe.parent, env=env)


def _run(recipe: Path, log: Path) -> None:
    proc = _start(recipe, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def _teacher_files_recorded(manifest: dict) -> int:
    return sum(f.startswith("teacher-") for e in manifest["shards"].values() for f in e["files"])


def _digest(cache_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(cache_dir)): sha256_file(p) for p in sorted(cache_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # .lock, .capture.lock


@pytest.mark.slow
def test_sigkill_mid_capture_resumes_byte_identical(kill_world, tmp_path, capsys):
    # The uninterrupted reference runs alongside the capture that gets killed.
    reference = _start(_recipe(kill_world, tmp_path, "reference"), tmp_path / "reference.log")
    recipe = _recipe(kill_world, tmp_path, "killed")
    cache_dir = tmp_path / "killed" / "cache"
    proc = _start(recipe, tmp_path / "killed.log")
    # Kill as soon as the manifest records a first teacher file, i.e. mid-way through the teachers.
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (cache_dir / "manifest.json").exists() and _teacher_files_recorded(mf.read_manifest(cache_dir)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "capture finished before the kill: make the data bigger"
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = _digest(tmp_path / "reference" / "cache")
    n_shards = len(mf.read_manifest(tmp_path / "reference" / "cache")["shards"])
    assert n_shards >= 6, n_shards

    killed = mf.read_manifest(cache_dir)
    recorded = _teacher_files_recorded(killed)
    assert not killed["complete"] and 1 <= recorded < 2 * n_shards, recorded
    with pytest.raises(CacheError, match="incomplete"):
        store.CacheReader(cache_dir)
    # The manifest only ever names finished files: each one it lists is whole, and equal to the reference.
    for shard, entry in killed["shards"].items():
        for fname, rec in entry["files"].items():
            path = cache_dir / shard / fname
            assert sha256_file(path) == rec["sha256"] == expected[f"{shard}/{fname}"], path

    # A kill can also land inside a manifest write (a small window): leave what that one leaves too.
    (cache_dir / "manifest.json.tmp99999").write_text('{"format": "distill-cache", "shar')
    _run(recipe, tmp_path / "resumed.log")
    resumed = _digest(cache_dir)
    assert not [p for p in resumed if ".tmp" in p]  # no temporary file survives the resume
    assert resumed == expected  # every shard file, teacher file and the manifest, byte for byte
    assert len([p for p in resumed if "/teacher-" in p]) == 2 * n_shards
    with pytest.raises(SystemExit) as verify:
        main(["cache", "verify", str(tmp_path / "killed")])
    assert verify.value.code == 0 and "all sha256 match" in capsys.readouterr().out
