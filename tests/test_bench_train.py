"""bench/train_bench.py runs (tiny models, char tokenizer; the V = 49,152 figures come from running it by hand)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_runs_on_tiny_models(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--tiny",
                          "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("| cache (3 teachers, from disk) |", "| online (3 teachers run each step) |",
                 "| ce (SFT floor, no teachers) |", "| TRL GKDTrainer (1 teacher, dense, lmbda=0) |",
                 "cache vs online:", "cache vs ce (SFT):"):
        assert line in out.stdout, out.stdout
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert set(summary["modes"]) == {"cache", "online", "ce", "trl"}
    # Same batch, same teachers, one codec path: the cached and the live signal differ only by the
    # float rounding of differently shaped teacher batches (capture ran 8 samples, the step 2).
    cache, online = summary["first_loss"]["cache"][0], summary["first_loss"]["online"][0]
    assert abs(cache - online) <= 1e-3 * abs(online) + 1e-5, (cache, online)
