"""LoRA experts over one base: the base is loaded once, adapters switched, and each expert's rows
equal the top-k of that adapter merged into its own fresh copy of the base."""

from __future__ import annotations

import numpy as np
import torch

from conftest import tiny_recipe, top_counts, write_recipe
from distill.cache import store
from distill.cache.capture import run_capture
from distill.config import load_recipe

K = 4
# Different modules per expert: switching must turn off the other experts' layers, not only its own on.
TARGETS = {"e0": ["q_proj", "v_proj"],
           "e1": ["o_proj", "down_proj"],
           "e2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _make_adapter(base, out, seed: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init (a no-op adapter); make each expert really differ
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                n += 1
    assert n > 0
    model.save_pretrained(out)
    return out


def _merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().eval()


def test_three_lora_experts_share_one_base_load(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_world["base"]
    adapters = {n: _make_adapter(base, tmp_path / n, seed, TARGETS[n]) for seed, n in enumerate(TARGETS)}
    teachers = [{"name": n, "model": str(base), "adapter": str(a)} for n, a in adapters.items()]
    teachers.append({"name": "plain", "model": str(base)})  # the base itself, adapters disabled
    recipe = tiny_recipe(tiny_world, tmp_path / "run", teachers=teachers,
                         cache={"top_k": K, "batch_size": 8, "shard_tokens": 200, "codec": "fp16"})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    report = run_capture(recipe)
    assert report.model_loads == 1  # one base for four teachers: adapters switched, never reloaded

    reader = store.CacheReader(recipe.cache.dir, verify="full")
    assert reader.teacher_names == ["e0", "e1", "e2", "plain"] and len(reader.manifest["shards"]) > 1
    c = reader.manifest["codec"]
    codec = reader.codec()  # from the manifest, id order included
    references = [_merged(base, adapters[n]) for n in TARGETS] + [AutoModelForCausalLM.from_pretrained(base).eval()]

    compared = total = 0
    for i in range(len(reader)):
        s = reader.sample(i)
        ids = torch.from_numpy(s["input_ids"])[None]
        pos = np.flatnonzero(s["target_mask"]) - 1  # position t predicts token t+1
        decoded = []
        for t, model in enumerate(references):
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, pos].float(), -1)
            got_ids, got_lp, got_res = codec.decode(torch.from_numpy(s["records"][t]))
            ref_lp, ref_ids = lp.topk(K + 1, dim=-1)
            # Ids are compared where the order of the top k+1 is not a near-tie (fp32 noise is ~1e-6).
            clear = (ref_lp[:, :-1] - ref_lp[:, 1:]).min(-1).values > 1e-4
            assert torch.equal(got_ids[clear], ref_ids[clear, :K]), (reader.teacher_names[t], i)
            # Log-probs of the ids the cache holds, within float16 rounding (|error| <= 2^-11 |x|).
            assert torch.allclose(got_lp, lp.gather(-1, got_ids), atol=1e-3, rtol=1e-3)
            rest = lp.scatter(-1, got_ids, float("-inf")).logsumexp(-1)
            assert torch.allclose(got_res, rest, atol=1e-3, rtol=1e-3)
            compared += int(clear.sum())
            total += len(pos)
            decoded.append(got_ids)
        if i == 0:  # the four teachers really differ (a switch that did nothing would fail here)
            assert all(not torch.equal(a, b) for j, a in enumerate(decoded) for b in decoded[j + 1:])
    assert compared >= 0.9 * total > 0, (compared, total)


def test_id_order_comes_from_the_first_teacher_with_its_adapter_active(tiny_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from distill.cache import codec_vk

    monkeypatch.setattr(codec_vk, "ID_ORDER_TOP", 3)  # the tiny vocabulary (42) is inside any top-128
    base = tiny_world["base"]
    adapter = _make_adapter(base, tmp_path / "e2", 2, TARGETS["e2"])
    teachers = [{"name": "e2", "model": str(base), "adapter": str(adapter)}, {"name": "plain", "model": str(base)}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_world, tmp_path / "run", teachers=teachers, cache={"top_k": K, "batch_size": 8, "shard_tokens": 200})))
    assert run_capture(recipe).model_loads == 1  # the order reuses the group's one load
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    assert reader.manifest["codec"]["id_order"]["teacher"] == "e2"
    order = torch.from_numpy(np.load(reader.dir / "id_order.npy")).long()
    expert = top_counts(_merged(base, adapter), reader, 3)
    plain = top_counts(AutoModelForCausalLM.from_pretrained(base).eval(), reader, 3)
    ranked = expert[order]
    assert (ranked[1:] <= ranked[:-1] + 2).all() and ranked[0] == expert.max()
    # The base's counts do not fit the order: it came from the expert, adapter on.
    assert not ((plain[order][1:] <= plain[order][:-1] + 2).all() and plain[order][0] == plain.max())
