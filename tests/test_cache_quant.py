"""Quantized teachers (bitsandbytes 8-bit / 4-bit, on CPU): the cache holds the quantized model's own
distributions, the manifest says so, and LoRA experts switch over a 4-bit base."""

from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

from conftest import _tiny, capture_batch_logprobs, tiny_recipe, write_recipe
from distill.cache import store
from distill.cache.capture import run_capture
from distill.cli import main
from distill.config import load_recipe
from distill.errors import ConfigError, DistillError
from distill.models import load_model

K = 4
PAD = 0  # the char tokenizer's pad id (capture pads with it)


@pytest.fixture(scope="module")
def qworld(tiny_world, tmp_path_factory) -> dict:
    """tiny_world with a hidden-64 base: bitsandbytes' CPU 4-bit kernels need in_features % 64 == 0."""
    return {**tiny_world, "base": _tiny(tmp_path_factory.mktemp("q") / "base", 0, tiny_world["tok"], hidden=64)}


def cached_vs(reader, t: int, refs: list[torch.Tensor], k: int, atol: float, gap: float = 1e-4) -> tuple[int, int]:
    """Check teacher t's decoded rows against reference log-probs `refs` (per sample, [n_targets, V]).

    Ids must equal the reference's top-k where its top k+1 log-probs are `gap` apart (no near-tie that
    float noise could flip). Returns (rows whose ids were so compared, rows)."""
    codec = reader.codec()
    compared = total = 0
    for i, lp in enumerate(refs):
        got_ids, got_lp, got_res = codec.decode(torch.from_numpy(reader.sample(i)["records"][t]))
        ref_lp, ref_ids = lp.topk(k + 1, dim=-1)
        clear = (ref_lp[:, :-1] - ref_lp[:, 1:]).min(-1).values > gap
        assert torch.equal(got_ids[clear], ref_ids[clear, :k]), (reader.teacher_names[t], i)
        assert torch.allclose(got_lp, lp.gather(-1, got_ids), atol=atol, rtol=atol), (reader.teacher_names[t], i)
        rest = lp.scatter(-1, got_ids, float("-inf")).logsumexp(-1)
        assert torch.allclose(got_res, rest, atol=atol, rtol=atol), (reader.teacher_names[t], i)
        compared += int(clear.sum())
        total += len(lp)
    return compared, total


def quantized_ok(reader, names: list[str], quantization: str) -> None:
    """Complete, every hash verifies, and the manifest records each teacher's quantization."""
    assert reader.manifest["complete"] and reader.teacher_names == names
    assert [t["quantization"] for t in reader.manifest["teachers"]] == [quantization] * len(names)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_teacher_caches_its_own_distributions(qworld, tmp_path, capsys, quantization):
    base = str(qworld["base"])
    recipe = tiny_recipe(qworld, tmp_path / "run", teachers=[{"name": "q", "model": base,
                                                                  "quantization": quantization}],
                         cache={"top_k": K, "batch_size": 8, "shard_tokens": 200, "codec": "fp16"})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert run_capture(recipe).model_loads == 1
    with pytest.raises(SystemExit) as verify:
        main(["cache", "verify", str(tmp_path / "run")])
    assert verify.value.code == 0 and "all sha256 match" in capsys.readouterr().out
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    quantized_ok(reader, ["q"], quantization)
    assert len(reader.manifest["shards"]) > 1

    model = load_model(base, quantization=quantization, device="cpu").eval()  # as capture loaded it
    assert model.is_quantized
    # float16 log-probs (|error| <= 2^-11 |x|), as the fp32 capture tests.
    compared, total = cached_vs(reader, 0, capture_batch_logprobs(model, reader, 8, PAD), K, atol=2e-3)
    assert compared >= 0.9 * total > 0, (compared, total)
    # The rows are the quantized model's, not the full-precision one's: they fail its check.
    full = load_model(base, dtype="float32", device="cpu").eval()
    with pytest.raises(AssertionError):
        cached_vs(reader, 0, capture_batch_logprobs(full, reader, 8, PAD), K, atol=2e-3)


def _adapter(base: str, out, seed: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init (a no-op adapter); make each expert really differ
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


def test_lora_experts_switch_over_one_4bit_base(qworld, tmp_path):
    base = str(qworld["base"])
    adapters = {"e0": _adapter(base, tmp_path / "e0", 0, ["q_proj", "v_proj"]),
                "e1": _adapter(base, tmp_path / "e1", 1, ["o_proj", "down_proj"])}
    teachers = [{"name": n, "model": base, "adapter": str(a), "quantization": "4bit"} for n, a in adapters.items()]
    teachers.append({"name": "plain", "model": base, "quantization": "4bit"})  # adapters off
    recipe = tiny_recipe(qworld, tmp_path / "run", teachers=teachers,
                         cache={"top_k": K, "batch_size": 8, "shard_tokens": 200, "codec": "fp16"})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert run_capture(recipe).model_loads == 1  # one 4-bit base, adapters switched on it
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    quantized_ok(reader, ["e0", "e1", "plain"], "4bit")

    # Each expert's reference: its own fresh 4-bit base with only its adapter (a 4-bit base cannot be
    # merged exactly, so unmerged is the reference); the LoRA layers run over the quantized weights.
    refs = [load_model(base, quantization="4bit", adapter=str(adapters[n]), device="cpu").eval() for n in adapters]
    refs.append(load_model(base, quantization="4bit", device="cpu").eval())
    assert all("Linear4bit" in {type(m).__name__ for m in r.modules()} for r in refs)
    for t, ref in enumerate(refs):
        compared, total = cached_vs(reader, t, capture_batch_logprobs(ref, reader, 8, PAD), K, atol=2e-3)
        assert compared >= 0.9 * total > 0, (reader.teacher_names[t], compared, total)
    rows = [torch.from_numpy(reader.sample(0)["records"][t]) for t in range(3)]
    assert all(not torch.equal(a, b) for j, a in enumerate(rows) for b in rows[j + 1:])  # the switch did something


def test_4bit_shapes_bitsandbytes_cannot_run_on_this_cpu_are_one_line(tiny_world, tmp_path, capsys):
    from bitsandbytes.functional import has_avx512bf16

    base = str(tiny_world["base"])  # hidden 32: below bitsandbytes' 4-bit block of 64
    if not has_avx512bf16():  # this CPU takes bitsandbytes' generic path, which runs any shape
        model = load_model(base, quantization="4bit", device="cpu", what="teacher q").eval()
        with torch.no_grad():
            assert model(torch.randint(3, 40, (1, 8))).logits.isfinite().all()
        return
    recipe = tiny_recipe(tiny_world, tmp_path / "run", teachers=[{"name": "q", "model": base, "quantization": "4bit"}])
    with pytest.raises(SystemExit) as exc:  # before: a reshape traceback from inside the first forward
        main(["cache", str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert re.search(r"^distill: error: teacher q: quantization: 4bit cannot run on this CPU: .* "
                     r"model\.layers\.0\.self_attn\.q_proj is 32 -> 32 \(use 8bit, none, or a GPU\)$", err, re.M), err


def test_quantized_model_lands_on_the_device_asked_for(qworld):
    # Without a device_map transformers puts a bitsandbytes model on the current CUDA device whatever
    # `device` says (and it cannot be moved afterwards); on a CUDA machine this put it on cuda:0.
    for quantization in ("8bit", "4bit"):
        model = load_model(str(qworld["base"]), quantization=quantization, device="cpu")
        assert {p.device.type for p in model.parameters()} == {"cpu"}, quantization


def test_int8_cast_warning_is_logged_once_not_per_matmul(qworld, caplog):
    model = load_model(str(qworld["base"]), quantization="8bit", device="cpu").eval()
    ids = torch.randint(3, 40, (2, 8))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(3):
            model(ids)
    # 2 layers x 7 projections x 3 forwards would log 42 identical lines.
    assert sum("MatMul8bitLt: inputs will be cast" in r.getMessage() for r in caplog.records) <= 1


def test_missing_bitsandbytes_is_one_line_naming_the_key(qworld, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(DistillError, match=r"^teacher q: quantization: 4bit needs bitsandbytes "
                                           r"\(pip install 'distill\[quant\]'\)$"):
        load_model(str(qworld["base"]), quantization="4bit", device="cpu", what="teacher q")


def test_quantized_gguf_teacher_is_refused_at_recipe_load(qworld, tmp_path):
    teachers = [{"name": "q", "model": str(qworld["base"]), "gguf_file": "m.gguf", "quantization": "8bit"}]
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(qworld, tmp_path / "run", teachers=teachers))
    with pytest.raises(ConfigError, match=r"r.yaml: teachers\[0\]\.quantization: 8bit cannot be combined with gguf_file"):
        load_recipe(path)
