"""Numerical faults and concurrency, on real runs of the tiny models (docs/reliability.md).

- a teacher whose logits hold NaN is stopped at capture, naming the teacher and the sample, and
  nothing of its shard is written (the NaN student loss on every launch type is in
  tests/test_multiprocess.py and tests/test_train.py);
- two `distill cache` processes on one run directory: one refuses at once, the other ends a
  correct cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import _tiny, tiny_recipe, write_recipe
from distill.cache import manifest as mf
from distill.cache import store
from distill.cli import main
from distill.files import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _nan_teacher(world: dict, path: Path, char: str) -> Path:
    """A tiny teacher whose input embedding of `char` is NaN: every position from that token on
    predicts NaN, earlier ones are finite (untied head, so other positions' logits stay finite)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = world["tok"]
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids(char)] = float("nan")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nan_teacher_is_named_with_its_sample_and_nothing_is_written(tiny_world, tmp_path, capsys):
    bad = _nan_teacher(tiny_world, tmp_path / "nan_teacher", "9")
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(bad)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(SystemExit) as e:
        main(["cache", str(path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    # rows are "i+(i+1)=" -> "2i+1": the first with a 9 is row 4 ("4+5=" -> "9")
    assert "teacher tb: non-finite logits (NaN or inf) at sample 4 of the calibration data" in lines[0], lines[0]
    cache = tmp_path / "run" / "cache"
    m = mf.read_manifest(cache)
    assert not m["complete"]
    assert all(mf.teacher_file("tb") not in e["files"] for e in m["shards"].values())
    assert not list(cache.glob("shard-*/teacher-tb.npy*"))
    with pytest.raises(SystemExit) as e:  # nothing trains on it
        main(["train", str(path)])
    assert e.value.code == 2 and "incomplete" in capsys.readouterr().err


def _held(lock: Path) -> bool:
    """Whether another process holds the flock on `lock`."""
    if not lock.exists():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_two_captures_on_one_run_directory(tiny_world, tmp_path, capsys):
    """A second `distill cache` started while a first one captures into the same run directory
    refuses in one line (exit 2) naming the cache and the first one's pid; the first ends a cache
    byte-identical to one captured alone."""
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choice("abcdefghij") for _ in range(40)) + "=", "response": "xyz" * 5}
            for _ in range(400)]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    world = {**tiny_world, "ta": _tiny(tmp_path / "ta", 11, tiny_world["tok"], hidden=128),
             "tb": _tiny(tmp_path / "tb", 12, tiny_world["tok"], hidden=128)}

    def recipe(run: str) -> Path:
        r = tiny_recipe(world, tmp_path / run, cache={"top_k": 8, "batch_size": 16, "shard_tokens": 4000})
        r["data"] = {"sources": [{"path": str(data)}], "max_length": 64}
        return write_recipe(tmp_path / f"{run}.yaml", r)

    path = recipe("run")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "distill", "cache", str(path)], cwd=ROOT, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    cache = tmp_path / "run" / "cache"
    deadline = time.time() + 120
    while not _held(mf.capture_lock_path(cache)) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, log.read_text()[-2000:]  # still capturing: the race is real
    with pytest.raises(SystemExit) as e:
        main(["cache", str(path)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"{cache}: another `distill cache` (pid {first.pid})" in errors[0], errors[0]
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    with pytest.raises(SystemExit) as e:  # the same capture alone, for the bytes
        main(["cache", str(recipe("alone"))])
    assert e.value.code == 0
    store.CacheReader(cache, verify="full")
    alone = tmp_path / "alone" / "cache"
    assert {p.relative_to(cache): sha256_file(p) for p in sorted(cache.rglob("*.npy"))} == \
        {p.relative_to(alone): sha256_file(p) for p in sorted(alone.rglob("*.npy"))}
