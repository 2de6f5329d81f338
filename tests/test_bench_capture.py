"""bench/capture_bench.py runs, timing and quantized-teacher fidelity (on a tiny random model; the SmolLM2
figures come from running it by hand)."""

import json
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
                 "shipped path: capture forward_s", "| float32 | cached: codec alone |",
                 "| 8bit | full distribution: quantization alone |", "| 8bit | cached: quantization + codec |",
                 "| 4bit | full distribution: quantization alone |", "| 4bit | cached: quantization + codec |"):
        assert line in out.stdout, out.stdout
    fid = {(r["teacher"], r["rows"]): r for r in json.loads((tmp_path / "r.json").read_text())["summary"]["fidelity"]}
    codec, full4, cached4 = fid["float32", "cached"], fid["4bit", "full distribution"], fid["4bit", "cached"]
    assert 0 < codec["tvd"] < 1 and codec["top1"] == 1.0  # the codec keeps the top-1 exactly
    assert 0 < full4["tvd"] < cached4["tvd"]  # the 4-bit weights change the distribution; the codec adds to that
    assert cached4["top1"] == full4["top1"] < 1  # and the codec keeps the quantized teacher's top-1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("capture-bench-")]  # its temp dir is removed
