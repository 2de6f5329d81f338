"""Merges (linear, TIES, DARE) against the maths written out naively: on small tensors, on tiny
Llama full fine-tunes (task vectors against a base), and on LoRA experts of different ranks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe, write_recipe
from distill.config import MergeConfig, load_recipe
from distill.merge import merge_experts, merge_tensors, merged_model


def naive_ties(vectors, weights, density, sign_method="total"):
    """TIES (Yadav et al. 2023) element by element: trim each vector to its top `density` by
    magnitude, elect a sign per entry, average the weighted entries that agree with it."""
    trimmed = []
    for v in vectors:
        flat, k = v.flatten(), int(density * v.numel())
        keep = sorted(range(flat.numel()), key=lambda i: -abs(flat[i].item()))[:k]
        t = torch.zeros_like(flat)
        t[keep] = flat[keep]
        trimmed.append(t)
    out = torch.zeros_like(trimmed[0])
    for j in range(out.numel()):
        vals = [t[j].item() for t in trimmed]
        score = sum(vals) if sign_method == "total" else sum((x > 0) - (x < 0) for x in vals)
        sign = 1 if score >= 0 else -1
        agree = [w * x for w, x in zip(weights, vals) if x != 0 and (x > 0) == (sign > 0)]
        out[j] = sum(agree) / max(1, len(agree))
    return out.view(vectors[0].shape)


def _spec(method, weights, **kw):
    return MergeConfig(merge=[str(i) for i in range(len(weights))], method=method, weights=weights, **kw)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_equals_the_naive_computation(density, sign_method):
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    got = merge_tensors(vectors, _spec("ties", weights, density=density, majority_sign_method=sign_method))
    torch.testing.assert_close(got, naive_ties(vectors, weights, density, sign_method))


def test_linear_is_the_weighted_sum():
    vectors = [torch.randn(4, 3) for _ in range(2)]
    got = merge_tensors(vectors, _spec("linear", [0.25, 0.75]))
    torch.testing.assert_close(got, 0.25 * vectors[0] + 0.75 * vectors[1])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_with_a_seeded_bernoulli_mask_and_rescales(method):
    """DARE (Yu et al. 2023): keep each entry with probability `density`, divide the kept ones by it;
    then sum (dare_linear) or TIES' sign election and disjoint mean without trimming (dare_ties)."""
    density, weights = 0.4, [0.7, 1.3]
    vectors = [torch.randn(200, 50, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(2)]
    spec = _spec(method, weights, density=density, majority_sign_method="total" if method == "dare_ties" else None)
    torch.manual_seed(5)
    got = merge_tensors(vectors, spec)
    torch.manual_seed(5)  # the same draws, written out: one Bernoulli(density) mask per vector, in order
    dropped = [v * torch.bernoulli(torch.full_like(v, density)) / density for v in vectors]
    if method == "dare_linear":
        want = weights[0] * dropped[0] + weights[1] * dropped[1]
    else:
        want = naive_ties([d[:4] for d in dropped], weights, 1.0)  # the elementwise reference is slow: 4 rows
        got = got[:4]
    torch.testing.assert_close(got, want)
    # Properties: about `density` of each vector survives, each survivor is v / density, and the
    # expectation is kept (mean of the merged sum ~ the undropped sum's, over 10k entries).
    kept = dropped[0] != 0
    assert abs(kept.float().mean().item() - density) < 0.03
    torch.testing.assert_close(dropped[0][kept], vectors[0][kept] / density)
    if method == "dare_linear":
        full = weights[0] * vectors[0] + weights[1] * vectors[1]
        assert abs(got.mean().item() - full.mean().item()) < 0.1


def _world_recipe(tiny_world, tmp_path, teachers, models):
    recipe = tiny_recipe(tiny_world, tmp_path / "run", eval={"tasks": [], "student": False, "models": models})
    recipe["teachers"] = teachers
    return load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def _floats(path):
    return {k: v for k, v in load_file(path / "model.safetensors").items() if v.is_floating_point()}


def test_full_fine_tune_ties_equals_naive_per_tensor(tiny_world, tmp_path):
    """Full fine-tunes: task vectors against `base`; the written baseline is base + TIES(vectors)."""
    teachers = [{"name": "ta", "model": str(tiny_world["ta"])}, {"name": "tb", "model": str(tiny_world["tb"])}]
    recipe = _world_recipe(tiny_world, tmp_path, teachers, [
        {"name": "ties", "merge": ["ta", "tb"], "method": "ties", "density": 0.5, "base": str(tiny_world["base"])}])
    m = recipe.eval.models[0]
    assert m.weights == [1.0, 1.0] and m.majority_sign_method == "total"  # resolved on load
    out = merge_experts(recipe, m, tmp_path / "run" / "baselines" / "ties", log=lambda *_: None)
    got, base = _floats(out), _floats(tiny_world["base"])
    experts = [_floats(tiny_world["ta"]), _floats(tiny_world["tb"])]
    assert got.keys() == base.keys() and len(got) > 10
    for k in got:
        want = base[k] + naive_ties([e[k] - base[k] for e in experts], [1.0, 1.0], 0.5)
        torch.testing.assert_close(got[k], want, msg=k)
    assert json.loads((out / "merge.json").read_text())["merge"]["method"] == "ties"


def test_dare_merge_is_seeded_and_rebuilt_when_its_recipe_changes(tiny_world, tmp_path):
    teachers = [{"name": "ta", "model": str(tiny_world["ta"])}, {"name": "tb", "model": str(tiny_world["tb"])}]
    models = [{"name": "m", "merge": ["ta", "tb"], "method": "dare_linear", "density": 0.5,
               "base": str(tiny_world["base"])}]
    out = tmp_path / "run" / "baselines" / "m"

    def merge(seed):
        models[0]["seed"] = seed
        recipe = _world_recipe(tiny_world, tmp_path, teachers, models)
        return _floats(merge_experts(recipe, recipe.eval.models[0], out, log=lambda *_: None))

    first = merge(0)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    second = merge(0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # same merge: reused, not rewritten
    recipe = _world_recipe(tiny_world, tmp_path, teachers, models)
    again = {k: v for k, v in merged_model(recipe, recipe.eval.models[0], "m").state_dict().items()}
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same seed draws the same masks
    other = merge(1)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # another seed: rebuilt, other masks


def _lora(base, out, seed, r, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r,
                                                                                  target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init; make each expert act
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


def lora_deltas(adapter) -> dict[str, torch.Tensor]:
    """Weight name -> (alpha / r) * B @ A, read from the adapter's files (the reference)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for k in w:
        if k.endswith("lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            out[name] = cfg["lora_alpha"] / cfg["r"] * w[k.replace("lora_A", "lora_B")] @ w[k]
    assert out
    return out


@pytest.fixture(scope="module")
def lora_experts(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"e0": _lora(tiny_world["base"], root / "e0", 0, 2, ["q_proj", "v_proj"]),
            "e1": _lora(tiny_world["base"], root / "e1", 1, 4, ["q_proj", "o_proj"])}  # other rank, other modules


def test_lora_linear_merge_is_base_plus_weighted_deltas(tiny_world, tmp_path, lora_experts):
    teachers = [{"name": n, "model": str(tiny_world["base"]), "adapter": str(p)} for n, p in lora_experts.items()]
    recipe = _world_recipe(tiny_world, tmp_path, teachers,
                           [{"name": "lin", "merge": ["e0", "e1"], "weights": [0.3, 0.7]}])
    m = recipe.eval.models[0]
    assert m.base == str(tiny_world["base"])  # the LoRA experts' base, resolved on load
    got = _floats(merge_experts(recipe, m, tmp_path / "run" / "baselines" / "lin", log=lambda *_: None))
    want = _floats(tiny_world["base"])
    for w, adapter in zip(m.weights, lora_experts.values()):
        for k, d in lora_deltas(adapter).items():
            want[k] = want[k] + w * d
    assert got.keys() >= want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lora_ties_merges_the_deltas(tiny_world, tmp_path, lora_experts):
    """TIES over LoRA experts is TIES of their weight deltas (not of their A/B factors): exact, any ranks."""
    teachers = [{"name": n, "model": str(tiny_world["base"]), "adapter": str(p)} for n, p in lora_experts.items()]
    recipe = _world_recipe(tiny_world, tmp_path, teachers,
                           [{"name": "t", "merge": ["e0", "e1"], "method": "ties", "density": 0.25}])
    got = _floats(merge_experts(recipe, recipe.eval.models[0], tmp_path / "run" / "baselines" / "t",
                                log=lambda *_: None))
    base = _floats(tiny_world["base"])
    deltas = [lora_deltas(a) for a in lora_experts.values()]
    for k in base:
        vecs = [d.get(k, torch.zeros_like(base[k])) for d in deltas]  # an expert that does not adapt k: 0
        want = base[k] + naive_ties(vecs, [1.0, 1.0], 0.25) if any(k in d for d in deltas) else base[k]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)
    assert sum(k in d for d in deltas for k in base) == 8  # per layer: e0 q, v; e1 q, o (2 layers)
