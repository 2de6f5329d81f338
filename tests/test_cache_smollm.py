"""The cache on a real LLM: SmolLM2-135M-Instruct's cached rows equal its own logits (fp32, 8-bit, 4-bit)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import capture_batch_logprobs, needs_smollm_wheel, write_recipe
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


def _capture(tmp_path, capsys, teachers: list[dict], rows=ROWS):
    path = str(smollm.smollm2_path())  # ~45 s the first time, then cached
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    recipe = {
        "name": "smollm-cache", "run_dir": str(tmp_path / "run"),
        "teachers": [{"model": path} | t for t in teachers],
        "student": {"model": path},
        "data": {"sources": [{"path": str(data)}], "max_length": 64},
        "cache": {"top_k": K, "batch_size": 4, "shard_tokens": 16, "codec": "fp16"},
    }
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    report = run_capture(recipe)
    assert report.model_loads == 1 and report.rows > 0
    with pytest.raises(SystemExit) as verify:
        main(["cache", "verify", str(tmp_path / "run")])
    assert verify.value.code == 0 and "all sha256 match" in capsys.readouterr().out
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    assert reader.manifest["codec"]["vocab_size"] == 49152 and len(reader) == len(rows)
    assert len(reader.manifest["shards"]) > 1
    return path, reader


def _check_rows(reader, t: int, refs: list[torch.Tensor], tol: float = 2e-3) -> None:
    """Teacher t's decoded rows equal the reference log-probs `refs` (per sample, [n_targets, V]) within `tol`."""
    codec = reader.codec()  # from the manifest, id order included
    compared = total = 0
    for i, lp in enumerate(refs):
        got_ids, got_lp, got_res = codec.decode(torch.from_numpy(reader.sample(i)["records"][t]))
        ref_lp, ref_ids = lp.topk(2, dim=-1)
        clear = ref_lp[:, 0] - ref_lp[:, 1] > 1e-3  # top-1 not a near-tie
        assert torch.equal(got_ids[clear, 0], ref_ids[clear, 0]), i
        # float16 log-probs: |error| <= 2^-11 |x|, plus batching/padding noise in the forward.
        assert torch.allclose(got_lp, lp.gather(-1, got_ids), atol=tol, rtol=tol), i
        rest = lp.scatter(-1, got_ids, float("-inf")).logsumexp(-1)
        assert torch.allclose(got_res, rest, atol=tol, rtol=tol), i
        compared += int(clear.sum())
        total += len(lp)
    assert compared >= 0.8 * total > 0, (compared, total)


def _unbatched(model, reader) -> list[torch.Tensor]:
    out = []
    for i in range(len(reader)):
        s = reader.sample(i)
        pos = np.flatnonzero(s["target_mask"]) - 1  # position t predicts token t+1
        with torch.no_grad():
            out.append(torch.log_softmax(model(torch.from_numpy(s["input_ids"])[None]).logits[0, pos].float(), -1))
    return out


@pytest.mark.smollm
@needs_smollm_wheel
def test_smollm2_rows_match_its_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    # float32 on every device, so the CPU reference below is the same computation.
    path, reader = _capture(tmp_path, capsys, [{"name": "smol", "dtype": "float32"}])
    _check_rows(reader, 0, _unbatched(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), reader))


def _smollm_adapter(path: str, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter change the outputs
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return str(out)


@pytest.mark.smollm
@pytest.mark.slow
@needs_smollm_wheel
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_smollm2_rows_match_the_quantized_logits(tmp_path, capsys, quantization):
    from distill.models import load_model, load_tokenizer

    teachers = [{"name": "q", "quantization": quantization}]
    if quantization == "4bit":  # and a LoRA expert switched on over the same 4-bit base
        adapter = _smollm_adapter(str(smollm.smollm2_path()), tmp_path / "lora")
        teachers.append({"name": "qlora", "quantization": quantization, "adapter": adapter})
    path, reader = _capture(tmp_path, capsys, teachers, rows=ROWS[:3])
    assert [t["quantization"] for t in reader.manifest["teachers"]] == [quantization] * len(teachers)
    pad = load_tokenizer(path).pad_token_id  # capture's padding (EOS for SmolLM2)
    for t, spec in enumerate(teachers):
        model = load_model(path, quantization=quantization, adapter=spec.get("adapter"), device="cpu").eval()
        # In capture's own batches: 8-bit outputs depend on the batch (see capture_batch_logprobs).
        _check_rows(reader, t, capture_batch_logprobs(model, reader, 4, pad))
        if t == 1:  # the expert's rows are its own, not the base's
            assert not torch.equal(torch.from_numpy(reader.sample(0)["records"][0]),
                                   torch.from_numpy(reader.sample(0)["records"][1]))
