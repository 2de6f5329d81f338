"""Real multi-process runs on CPU: `accelerate launch` with 2 processes over gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, tiny_recipe, write_recipe
from distill.cache.capture import run_capture
from distill.config import load_recipe

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
           "-m", "distill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_ddp_two_processes_trains_and_saves(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tiny_world, tmp_path / "run",
                         # Length grouping off: the first and last logged windows are compared, which
                         # needs every window to be a random draw of the data, not of one length group.
                         train={"max_steps": 12, "batch_size": 2, "lr": 1e-2, "log_every_steps": 3,
                                "schedule": "constant", "group_by_length": False},
                         wandb={"enabled": True, "mode": "offline", "project": "distill-test"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_capture(load_recipe(path))
    proc = _launch(["train", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    result = json.loads((run / "train_result.json").read_text())
    assert result["steps"] == 12
    losses = [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    with torch.no_grad():
        out = student(torch.tensor([[1, 5, 6, 16]])).logits
    assert torch.isfinite(out).all()
    # W&B offline run directory with the loss history.
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs, list((run / "wandb").glob("*"))
    logs = list(runs[0].glob("*.wandb"))
    assert logs and b"loss" in logs[0].read_bytes()


@pytest.mark.slow
def test_two_process_capture_equals_one_process(tiny_world, tmp_path):
    """Ranks split the shards; the cache is byte-identical to a single-process capture."""
    from distill.files import sha256_file

    def digest(cache_dir: Path) -> dict:
        return {str(p.relative_to(cache_dir)): sha256_file(p) for p in sorted(cache_dir.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}  # .lock, .capture.lock

    single = write_recipe(tmp_path / "one.yaml", tiny_recipe(tiny_world, tmp_path / "one"))
    double = write_recipe(tmp_path / "two.yaml", tiny_recipe(tiny_world, tmp_path / "two"))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same kernels as each launched rank
    proc = subprocess.run([sys.executable, "-m", "distill", "cache", str(single)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _launch(["cache", str(double)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = digest(tmp_path / "one" / "cache"), digest(tmp_path / "two" / "cache")
    assert len(one) > 10 and one == two


def _partitioned_zero3(tmp_path: Path) -> Path:
    """launch/zero3.yaml with every parameter partitioned and released as soon as possible
    (the tiny model is otherwise below DeepSpeed's persistence threshold)."""
    root = Path(__file__).resolve().parent.parent
    cfg = json.loads((root / "launch" / "zero3.json").read_text())
    cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                    stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0,
                                    reduce_bucket_size=1000)
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    text = (root / "launch" / "zero3.yaml").read_text().replace("launch/zero3.json", str(tmp_path / "z3.json"))
    (tmp_path / "z3.yaml").write_text(text)
    return tmp_path / "z3.yaml"


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_match_ddp(tiny_world, tmp_path):
    """The same 2-process run under DDP, ZeRO-2 and ZeRO-3 (gloo, CPU) gives the same student.

    DeepSpeed runs on CPU only without ACCELERATE_USE_CPU (accelerate's cpu flag turns
    DeepSpeed off and silently falls back to DDP), so the log line naming the setup is checked.
    """
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    recipe = tiny_recipe(tiny_world, tmp_path / "run",
                         train={"max_steps": 6, "batch_size": 2, "lr": 1e-2, "schedule": "constant"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_capture(load_recipe(path))
    students = {}
    variants = [("ddp", ["--multi_gpu"], "DDP, 2 processes"),
                ("zero2", ["--config_file", "launch/zero2.yaml", "--mixed_precision", "no"], "DeepSpeed ZeRO-2"),
                ("zero3", ["--config_file", "launch/zero3.yaml", "--mixed_precision", "no"], "DeepSpeed ZeRO-3"),
                ("zero3_partitioned", ["--config_file", str(_partitioned_zero3(tmp_path)), "--mixed_precision",
                                       "no"], "DeepSpeed ZeRO-3")]
    for name, extra, setup in variants:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if name == "ddp":
            env["ACCELERATE_USE_CPU"] = "1"
        cmd = [ACCELERATE, "launch", *extra, "--num_processes", "2", "--main_process_port", free_port(),
               "-m", "distill", "train", str(path), f"run_dir={tmp_path / name}",
               f"cache.dir={tmp_path / 'run' / 'cache'}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=900)
        assert proc.returncode == 0, (name, proc.stderr[-4000:])
        assert f"train: {setup}" in proc.stdout, (name, proc.stdout[-2000:])
        students[name] = load_file(tmp_path / name / "student" / "model.safetensors")
    base = load_file(Path(tiny_world["base"]) / "model.safetensors")
    assert students["ddp"]
    for k, v in students["ddp"].items():
        assert not torch.allclose(v, base[k]), k  # it trained
        for name in ("zero2", "zero3", "zero3_partitioned"):
            # DeepSpeed reduces gradients in buckets of its own order: equal up to float rounding.
            assert torch.allclose(v, students[name][k], atol=2e-5), (name, k, (v - students[name][k]).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_divergence_under_ddp_and_zero2_keeps_the_last_finite_weights(tiny_world, tmp_path, launch):
    """A NaN in one cached teacher record (what a teacher overflowing in half precision writes)
    under total variation gives a NaN loss with finite gradients: no gradient check can see it, and
    under DeepSpeed accelerate's backward would already have stepped the engine. The run must stop
    with the one-line error before the update, so the checkpoints on disk are all finite and the
    last one is the step before; the failing step's update never happens."""
    from safetensors.torch import load_file

    from distill import batches as B
    from distill.cache.manifest import teacher_file
    from distill.cache.store import CacheReader
    from distill.checkpoint import latest, verify

    root = Path(__file__).resolve().parent.parent
    recipe = tiny_recipe(tiny_world, tmp_path / "run", cache={"top_k": 4, "batch_size": 8, "shard_tokens": 200,
                                                              "codec": "fp16", "verify": "sizes"},
                         loss={"divergence": "tvd"},
                         train={"max_steps": 6, "batch_size": 2, "lr": 1e-2, "schedule": "constant",
                                "save_every_steps": 1, "log_every_steps": 100})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_capture(load_recipe(path))
    # Poison one logprob of the first sample of step 4's global micro-batch (the trainer's plan).
    reader = CacheReader(tmp_path / "run" / "cache")
    plans = B.PlanCache(len(reader), 2, 2, 0, len(reader) // 4)
    victim = plans.batch(3)[0]
    shard, j = reader._locate(victim)
    row = int(shard.row_offsets[j])
    f = tmp_path / "run" / "cache" / shard.name / teacher_file("ta")
    rows = np.load(f)
    # fp16 codec: 4 uint16 ids, then logprobs. A poisoned cache, not a corrupt one: cache.verify is sizes
    rows[row, 8:10] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    np.save(f, rows)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = ["--multi_gpu"] if launch == "ddp" else ["--config_file", "launch/zero2.yaml", "--mixed_precision", "no"]
    if launch == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [ACCELERATE, "launch", *extra, "--num_processes", "2", "--main_process_port", free_port(),
           "-m", "distill", "train", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert proc.returncode != 0
    assert "distill: error: training diverged at step 4: non-finite loss" in proc.stderr, proc.stderr[-3000:]
    last = latest(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name == "step-00000003", last
    verify(last)
    files = sorted(last.glob("**/*.safetensors")) or sorted(last.glob("**/*model_states.pt"))
    assert files, sorted(last.rglob("*"))
    weights = load_file(files[0]) if files[0].suffix == ".safetensors" else \
        torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())


@pytest.mark.slow
def test_zero2_step_skips_a_non_finite_update(tiny_world, tmp_path):
    """Under ZeRO-2, accelerate's backward steps the engine before anything can be checked; the
    public step must not: a NaN loss (finite gradients) raises NonFiniteStep, weights untouched."""
    root = Path(__file__).resolve().parent.parent
    recipe = tiny_recipe(tiny_world, tmp_path / "run", loss={"divergence": "tvd"},
                         train={"batch_size": 2, "lr": 1e-2, "mixed_precision": "no"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_capture(load_recipe(path))
    cmd = [ACCELERATE, "launch", "--config_file", "launch/zero2.yaml", "--num_processes", "2", "--mixed_precision",
           "no", "--main_process_port", free_port(), str(root / "tests" / "step_probe.py"), str(path),
           str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["raised"] and out["unchanged"] and out["tensors"] > 10, out
