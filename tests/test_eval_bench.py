"""The evaluation benchmark script runs (on a tiny random model; the SmolLM2 figures come from running it by hand)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_eval_bench_runs_on_a_tiny_model():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_bench.py"), "--tiny", "--boolq", "6",
                          "--mawps", "2", "--batch-size", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("| batched | 4 |", "| unbatched | 1 |", "| naive | 1 |", "batched / unbatched speed",
                 "same prediction 6/6", "identical generations 2/2"):
        assert line in out.stdout, out.stdout
