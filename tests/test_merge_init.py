"""Merge, then distill (`student.init`): the step-0 student is the merge, and training moves it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe, write_recipe
from distill.cache.capture import run_capture
from distill.config import load_recipe, recipe_dict
from distill.merge import merged_model
from distill.train import build_student, run_train
from test_merge import _lora, lora_deltas, naive_ties


def _recipe(tiny_world, tmp_path, teachers=None, **student):
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    if teachers:
        recipe["teachers"] = teachers
    recipe["student"].update(student)
    recipe["train"].update(max_steps=3, lr=1e-2, schedule="constant")
    return load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_full_student_starts_at_the_ties_merge_and_training_moves_it(tiny_world, tmp_path):
    init = {"merge": ["ta", "tb"], "method": "ties", "density": 0.5, "base": str(tiny_world["base"])}
    recipe = _recipe(tiny_world, tmp_path, init=init)
    resolved = recipe_dict(recipe)["student"]["init"]  # what <run>/recipe.resolved.yaml records
    assert resolved["method"] == "ties" and resolved["weights"] == [1.0, 1.0]
    assert resolved["majority_sign_method"] == "total"
    start = _params(build_student(recipe, "cpu"))
    want = _params(merged_model(recipe, recipe.student.init, "test"))
    base = load_file(tiny_world["base"] / "model.safetensors")
    assert start.keys() == want.keys()
    for k in start:
        torch.testing.assert_close(start[k], want[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(start[k], base[k]) for k in start)  # not the untouched student.model
    run_capture(recipe)
    run_train(recipe)
    from transformers import AutoModelForCausalLM

    trained = _params(AutoModelForCausalLM.from_pretrained(Path(recipe.run_dir) / "student"))
    moved = [k for k in start if k in trained and not torch.allclose(trained[k], start[k])]
    assert len(moved) > len(start) // 2, moved


@pytest.fixture(scope="module")
def experts(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("init_lora")
    return {"e0": _lora(tiny_world["base"], root / "e0", 0, 2, ["q_proj", "v_proj"]),
            "e1": _lora(tiny_world["base"], root / "e1", 1, 4, ["q_proj", "o_proj"])}


def _student_deltas(model) -> dict[str, torch.Tensor]:
    """Weight name -> scaling * B @ A of the student's "default" adapter."""
    out = {}
    for name, mod in model.named_modules():
        if "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
    return out


def _lora_teachers(tiny_world, experts):
    return [{"name": n, "model": str(tiny_world["base"]), "adapter": str(p)} for n, p in experts.items()]


def test_lora_student_adapter_starts_as_the_linear_merge(tiny_world, tmp_path, experts):
    """r = 8 >= 2 + 4: the rank-r fit is exact, so s * B @ A = sum of w_i * delta_i per layer."""
    lora = {"r": 8, "alpha": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    recipe = _recipe(tiny_world, tmp_path, _lora_teachers(tiny_world, experts), lora=lora,
                     init={"merge": ["e0", "e1"], "weights": [0.4, 0.6]})
    model = build_student(recipe, "cpu")
    assert list(model.peft_config) == ["default"]  # the experts' and the merged adapters are gone
    got = _student_deltas(model)
    refs = [lora_deltas(p) for p in experts.values()]
    assert got.keys() == refs[0].keys() | refs[1].keys()
    for k in got:
        want = sum(w * r.get(k, torch.zeros_like(got[k])) for w, r in zip([0.4, 0.6], refs))
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-5, msg=k)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)


def test_lora_student_adapter_is_the_best_rank_r_fit_of_ties_and_training_moves_it(tiny_world, tmp_path, experts):
    lora = {"r": 2, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    recipe = _recipe(tiny_world, tmp_path, _lora_teachers(tiny_world, experts), lora=lora,
                     init={"merge": ["e0", "e1"], "method": "ties", "density": 0.5})
    model = build_student(recipe, "cpu")
    got = _student_deltas(model)
    refs = [lora_deltas(p) for p in experts.values()]
    for k in got:
        full = naive_ties([r.get(k, torch.zeros_like(got[k])) for r in refs], [1.0, 1.0], 0.5)
        u, s, vh = torch.linalg.svd(full)
        torch.testing.assert_close(got[k], u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5, msg=k)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    run_capture(recipe)
    run_train(recipe)
    saved = load_file(Path(recipe.run_dir) / "student_adapter" / "adapter_model.safetensors")
    moved = [k for k, v in start.items() if not torch.allclose(saved[k.replace(".default", "")], v)]
    assert moved, "training left the merged adapter where it started"


def test_lora_student_needs_lora_experts_over_its_base(tiny_world, tmp_path):
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"student.init.merge\[0\].*LoRA adapter over student.model"):
        _recipe(tiny_world, tmp_path, lora={"r": 2}, init={"merge": ["ta"]})
