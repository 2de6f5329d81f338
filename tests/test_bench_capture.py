"""bench/capture_bench.py runs (on a tiny random model; the SmolLM2 figures come from running it by hand)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_capture_bench_runs_on_a_tiny_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "capture_bench.py"), "--tiny", "--texts", "2",
                          "--repeats", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("| bare forward (decoder + LM head on target rows) |", "| top-k (`sparse_from_logits`) |",
                 "| encode (`codec.encode` + numpy) |", "| write (capture's write_s) |",
                 "shipped path: capture forward_s"):
        assert line in out.stdout, out.stdout
    assert (tmp_path / "r.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("capture-bench-")]  # its temp dir is removed
