"""Resources (docs/reliability.md): a full disk or a file size limit during capture or checkpointing,
a cache that cannot fit, a batch that does not fit in memory. Each ends in one line naming what
to change, exit 2, and leaves no artifact that a later run takes for complete.

Real subprocesses under real limits: RLIMIT_FSIZE (a write past it fails with EFBIG, as a full
disk fails with ENOSPC), a small tmpfs mounted where this process may mount one (root, as CI),
and RLIMIT_AS for memory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _tiny, tiny_recipe, write_recipe
from distill.cache import manifest as mf
from distill.cache import store
from distill.cache.capture import bytes_to_write, run_capture
from distill.checkpoint import latest, list_checkpoints
from distill.config import load_recipe
from distill.files import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _distill(args: list[str], fsize: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m distill ARGS` in a child, its file size limit `fsize` bytes when given."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _digest(cache: Path) -> dict:
    return {str(p.relative_to(cache)): sha256_file(p) for p in sorted(cache.rglob("*.npy"))}


def _recipe(world, tmp_path: Path, run: Path, name: str = "r", **sections) -> Path:
    recipe = tiny_recipe(world, run, **sections)
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


# ---------------------------------------------------------------- the file size limit (any machine)


def test_capture_past_the_file_size_limit_leaves_nothing_taken_for_complete(tiny_world, tmp_path):
    cache = {"top_k": 4, "batch_size": 8, "shard_tokens": 100_000}  # one shard: its teacher files are the largest
    reference = _recipe(tiny_world, tmp_path, tmp_path / "ref", "ref", cache=cache)
    run_capture(load_recipe(reference))
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "ref" / "cache").rglob("*") if p.is_file()}
    below = max(v for k, v in sizes.items() if not k.startswith("teacher-"))
    limit = (below + sizes["teacher-ta.npy"]) // 2
    assert below < limit < sizes["teacher-ta.npy"], sizes

    path = _recipe(tiny_world, tmp_path, tmp_path / "run", cache=cache)
    proc = _distill(["cache", str(path)], fsize=limit)
    line = _one_error(proc)
    assert "file size limit" in line and "teacher-ta.npy" in line, line
    cache_dir = tmp_path / "run" / "cache"
    m = mf.read_manifest(cache_dir)
    assert not m["complete"] and all(not f.startswith("teacher-") for e in m["shards"].values() for f in e["files"])
    assert not list(cache_dir.rglob("*.tmp*")) and not list(cache_dir.rglob("teacher-*"))
    proc = _distill(["cache", str(path)])  # room again: it resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    store.CacheReader(cache_dir, verify="full")
    assert _digest(cache_dir) == _digest(tmp_path / "ref" / "cache")


def test_checkpoint_past_the_file_size_limit_is_named_and_never_taken_for_complete(tiny_world, tmp_path):
    train = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "save_every_steps": 1, "log_every_steps": 1}
    path = _recipe(tiny_world, tmp_path, tmp_path / "run", train=train)
    run_capture(load_recipe(path))
    proc = _distill(["train", str(path)], fsize=40_000)  # the cache's files fit, the optimizer state does not
    line = _one_error(proc)
    assert "saving checkpoint" in line and "file size limit" in line and "no checkpoint is complete yet" in line, line
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest(ckpts) is None and not (tmp_path / "run" / "student").exists()
    proc = _distill(["train", str(path), "--resume"])  # nothing to resume: it starts from step 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no complete checkpoint" in proc.stdout and "starting from step 0" in proc.stdout
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002", "step-00000003"]
    assert not list(ckpts.glob("*.tmp"))


# ---------------------------------------------------------------- a full disk (tmpfs, where it can be mounted)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of `size` bytes under tmp_path; remount(size) resizes it."""
    where = tmp_path / "disk"
    where.mkdir()

    def mount(size: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:80]}); the file size limit "
                        "tests above cover the same code paths")
        return where

    def remount(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    yield mount, remount
    subprocess.run(["umount", str(where)], capture_output=True)


def test_capture_that_cannot_fit_is_refused_before_any_teacher_runs(tiny_world, tmp_path, small_disk):
    mount, _ = small_disk
    disk = mount(16 * 1024)
    path = _recipe(tiny_world, tmp_path, disk / "run")
    proc = _distill(["cache", str(path)])
    line = _one_error(proc)
    assert str(disk / "run" / "cache") in line and "MiB more and its disk has" in line and "no shard" in line
    m = mf.read_manifest(disk / "run" / "cache")  # the plan is there; no shard file is
    assert not m["complete"] and not any(e["files"] for e in m["shards"].values())
    # the estimate is the size the capture writes (the same codec, on a disk with room)
    run_capture(load_recipe(_recipe(tiny_world, tmp_path, tmp_path / "roomy", "roomy")))
    written = sum(p.stat().st_size for p in (tmp_path / "roomy" / "cache").rglob("*.npy"))
    assert bytes_to_write(m) == written


def test_full_disk_at_a_checkpoint_keeps_the_last_complete_one(tiny_world, tmp_path, small_disk):
    """keep_last: 1 on a disk with room for one checkpoint and a half: saving the second fails with
    ENOSPC, the first stays complete and is named; with room again, --resume finishes the run."""
    mount, remount = small_disk
    train = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "save_every_steps": 1, "keep_last": 1,
             "log_every_steps": 1}
    probe = _recipe(tiny_world, tmp_path, tmp_path / "probe", "probe", train=train)
    run_capture(load_recipe(probe))
    assert _distill(["train", str(probe)]).returncode == 0
    pages = lambda folder: sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())  # noqa: E731
    one = pages(latest(tmp_path / "probe" / "checkpoints"))
    shutil.rmtree(tmp_path / "probe" / "checkpoints")
    shutil.rmtree(tmp_path / "probe" / "student")
    disk = mount(pages(tmp_path / "probe") + one + one // 2)
    shutil.copytree(tmp_path / "probe" / "cache", disk / "run" / "cache")
    path = _recipe(tiny_world, tmp_path, disk / "run", train=train)
    proc = _distill(["train", str(path)])
    line = _one_error(proc)
    assert "saving checkpoint" in line and "out of disk space" in line, line
    ckpts = disk / "run" / "checkpoints"
    assert f"the last complete checkpoint is {ckpts / 'step-00000001'}" in line, line
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000001"]
    remount(64 * 2**20)
    proc = _distill(["train", str(path), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and json.loads((disk / "run" / "train_result.json").read_text())["steps"] == 3


# ---------------------------------------------------------------- memory


DRIVER = """
import resource, sys
import torch  # noqa: F401  (imports first: the limit is for what the run allocates)
from distill.cli import main
import distill.train, distill.cache.capture, transformers  # noqa: F401
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), hard))
main(sys.argv[2:])
"""


def test_a_batch_that_does_not_fit_in_memory_names_the_knob(tiny_world, tmp_path):
    """A student with a 60,000-row vocabulary on samples of 29 target tokens: a micro-batch of 16 needs
    ~110 MB per tensor of target logits. Under an address-space limit 400 MB above what the process
    holds after its imports, batch size 16 fails naming train.batch_size (it needed more than 500 MB
    when measured), and batch size 1 trains under the same limit (it needed less than 300 MB)."""
    big = _tiny(tmp_path / "big_vocab", 0, tiny_world["tok"], vocab_size=60_000)
    rows = [{"prompt": f"{i:02d}=", "response": (str(i % 10) + "+") * 14} for i in range(32)]  # 29 targets
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for batch, code in ((16, 2), (1, 0)):
        recipe = tiny_recipe(tiny_world, tmp_path / f"run{batch}", student={"model": str(big)},
                             train={"max_steps": 2, "batch_size": batch, "lr": 1e-3}, loss={"chunk_size": 4096})
        recipe["data"] = {"sources": [{"path": str(data)}], "max_length": 32}
        recipe["cache"] = {"top_k": 4, "dir": str(tmp_path / "cache")}
        path = write_recipe(tmp_path / f"r{batch}.yaml", recipe)
        run_capture(load_recipe(path))
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(400 * 2**20), "train", str(path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        if code == 2:
            line = _one_error(proc)
            assert "out of memory at step 1 with train.batch_size 16" in line and "train.grad_accum" in line, line
            run = tmp_path / "run16"
            assert latest(run / "checkpoints") is None and not (run / "student").exists()
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
