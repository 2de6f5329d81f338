"""Progress output in a log file: plain lines, few of them, with the bar's postfix; tqdm on a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from conftest import tiny_recipe, write_recipe
from distill.progress import PlainProgress, progress


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plain_progress_prints_at_most_every_interval_and_at_the_end(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("distill.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = progress(total=400, desc="train", unit="steps", every_s=30, stream=out)
    assert isinstance(bar, PlainProgress)  # a StringIO is no terminal
    for _ in range(400):  # one step every 0.5 s: 200 s in all
        clock.t += 0.5
        bar.update(1)
        bar.set_postfix(loss="1.2340", tok_s="52")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 200 // 30 + 1  # one per 30 s, and the last
    assert lines[0] == "train: 60/400 steps (15%), loss 1.2340, tok_s 52, 30.0s elapsed"
    assert lines[-1] == "train: 400/400 steps (100%), loss 1.2340, tok_s 52, 3m20s elapsed"
    disabled = io.StringIO()
    bar = progress(total=3, desc="x", disable=True, stream=disabled)
    bar.update(3)
    bar.close()
    assert disabled.getvalue() == ""


def test_a_terminal_gets_tqdm():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    bar = progress(total=2, desc="t", stream=Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_real_run_logged_to_a_file_stays_readable(tiny_world, tmp_path):
    """`distill run` (cache, 40 train steps, eval) with stderr in a file: no carriage returns, few lines."""
    rows = [{"prompt": f"{i}+1=", "target": str(i + 1)} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "inc.yaml").write_text("kind: generate_exact\ndataset: t.jsonl\nmax_new_tokens: 3\n")
    recipe = tiny_recipe(tiny_world, tmp_path / "run", eval={"tasks": [str(tmp_path / "inc.yaml")], "limit": 4})
    recipe["train"].update(max_steps=40, log_every_steps=5)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    with open(tmp_path / "err.log", "w") as err, open(tmp_path / "out.log", "w") as out:
        proc = subprocess.run([sys.executable, "-m", "distill", "run", str(path)], stdout=out, stderr=err,
                              cwd=tmp_path, env=env, timeout=600)
    log = (tmp_path / "err.log").read_text() + (tmp_path / "out.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "\r" not in log
    assert "Loading weights" not in log  # transformers' per-load bars are off
    lines = log.splitlines()
    assert len(lines) < 80, "\n".join(lines)
    final = [x for x in lines if x.startswith("train: 40/40 steps (100%), loss ")]
    assert len(final) == 1 and "tok_s " in final[0] and "elapsed" in final[0]
    assert any(x.startswith("cache: ") and "shard·teacher" in x for x in lines)
    assert any(x.startswith("eval inc: 4/4 examples") for x in lines)
