"""The trainer on tiny real models: learns from the cache, saves a loadable student, budget, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill.cache.capture import run_capture
from distill.config import load_recipe
from distill.train import Budget, lr_lambda, run_train


@pytest.fixture
def cached(tiny_world, tmp_path):
    def make(overrides=(), **sections):
        path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", **sections))
        recipe = load_recipe(path, list(overrides))
        run_capture(recipe)
        return recipe
    return make


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_loss_decreases_and_student_reloads_identically(cached):
    from transformers import AutoModelForCausalLM

    recipe = cached(["train.max_steps=30", "train.lr=1e-2", "train.schedule=constant", "train.log_every_steps=5",
                     "loss.weighting=route", "train.group_by_length=true"])
    result = run_train(recipe)
    run = Path(recipe.run_dir)
    losses = [h["loss"] for h in _history(run)]
    assert result.steps == 30 and result.stopped_by == "done" and len(losses) == 6
    assert 0 <= result.padding_fraction < result.padding_fraction_ungrouped
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"share/ta", "share/tb", "div/ta", "lr", "tokens_per_s"} <= set(_history(run)[0])
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    from distill.checkpoint import latest

    ckpt = latest(run / "checkpoints")
    assert ckpt is not None and (ckpt / "CHECKSUMS.json").exists()
    from safetensors.torch import load_file

    trained = load_file(next(ckpt.glob("**/model.safetensors")))
    ids = torch.tensor([[1, 5, 6, 16, 7]])
    reference = AutoModelForCausalLM.from_pretrained(recipe.student.model)
    reference.load_state_dict({k.removeprefix("student."): v for k, v in trained.items()}, strict=False)
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reference(ids).logits, atol=1e-6)
        base = AutoModelForCausalLM.from_pretrained(recipe.student.model)
        assert not torch.allclose(student(ids).logits, base(ids).logits, atol=1e-4)


def test_routing_shares_follow_domains(cached):
    recipe = cached(["train.max_steps=3", "loss.weighting=route"])
    run_train(recipe)
    history = _history(Path(recipe.run_dir))
    assert len(history) == 3
    for h in history:
        assert abs(h["share/ta"] + h["share/tb"] - 1) < 1e-5
    # Both domains occur in the data (a single length-grouped batch may hold only one).
    assert 0 < sum(h["share/ta"] for h in history) / len(history) < 1


def test_budget_stops_early_with_usable_checkpoint(cached):
    from transformers import AutoModelForCausalLM

    recipe = cached(["train.max_steps=100000", "train.budget_minutes=0.25"])
    import time

    start = time.time()
    result = run_train(recipe, start=start)
    elapsed = time.time() - start
    assert result.stopped_by == "budget" and 0 < result.steps < 100000
    assert abs(elapsed - 15) <= 15, elapsed  # max(2%, 15 s) of the 15 s allotted
    AutoModelForCausalLM.from_pretrained(Path(recipe.run_dir) / "student")


def test_budget_rule():
    b = Budget(start=0.0, minutes=1.0, reserve_minutes=0.5, save_guess_s=2.0)
    b.step_s = [1.0, 3.0]
    assert b.fits_another_step(24.0) and not b.fits_another_step(25.5)
    assert Budget(0.0, None, 0.0, 1.0).fits_another_step(1e9)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules(schedule):
    f = lr_lambda(schedule, warmup=4, total=20)
    assert f(0) < f(3) <= 1.0 and f(4) == pytest.approx(1.0)
    end = f(20)
    assert end == pytest.approx({"cosine": 0.0, "linear": 0.0, "constant": 1.0}[schedule], abs=1e-9)


def test_resume_continues_exactly(cached, tmp_path):
    """Stop after 3 steps, resume to 6: same weights as 6 uninterrupted steps (constant schedule)."""
    from safetensors.torch import load_file

    common = ["train.schedule=constant", "train.lr=1e-2", "train.log_every_steps=1"]
    recipe = cached(common + ["train.max_steps=6"])
    run_train(recipe)
    straight = load_file(Path(recipe.run_dir) / "student" / "model.safetensors")

    second = load_recipe(tmp_path / "r.yaml", common + ["train.max_steps=3", f"run_dir={tmp_path / 'run2'}"])
    run_capture(second)
    first_half = run_train(second)
    assert first_half.steps == 3
    resumed = run_train(load_recipe(tmp_path / "r.yaml", common + ["train.max_steps=6",
                                                                   f"run_dir={tmp_path / 'run2'}"]), resume=True)
    assert resumed.steps == 6
    again = load_file(Path(second.run_dir) / "student" / "model.safetensors")
    assert straight.keys() == again.keys()
    for k in straight:
        assert torch.allclose(straight[k], again[k], atol=1e-6), k


def test_lora_student_trains_and_saves_merged(cached):
    """A LoRA student: only the adapters train; the saved student is the merged model and
    equals base + saved adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = cached(["train.max_steps=25", "train.lr=2e-2", "train.schedule=constant", "train.log_every_steps=5",
                     "student.lora.r=4", "student.lora.alpha=8", "student.gradient_checkpointing=true"])
    run_train(recipe)
    run = Path(recipe.run_dir)
    losses = [h["loss"] for h in _history(run)]
    assert losses[-1] < 0.9 * losses[0], losses
    merged = AutoModelForCausalLM.from_pretrained(run / "student")
    base = AutoModelForCausalLM.from_pretrained(recipe.student.model)
    via_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.student.model),
                                            run / "student_adapter")
    ids = torch.tensor([[1, 5, 6, 16, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, via_adapter(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)
    # Only the adapted projections moved; the embeddings / head and the MLPs are the base's.
    merged_sd, base_sd = merged.state_dict(), load_file(Path(recipe.student.model) / "model.safetensors")
    moved = {k for k in base_sd if not torch.equal(merged_sd[k], base_sd[k])}
    assert moved and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                         for k in moved), moved


def test_lora_on_the_head_is_refused(cached):
    from distill.errors import DistillError

    recipe = cached(["train.max_steps=1", "student.lora.r=4", "student.lora.target_modules=[q_proj,lm_head]"])
    with pytest.raises(DistillError, match="student.lora.target_modules"):
        run_train(recipe)


def test_gradient_checkpointing_changes_nothing_but_memory(cached, tmp_path):
    from safetensors.torch import load_file

    common = ["train.max_steps=4", "train.lr=1e-2", "train.schedule=constant"]
    plain = cached(common)
    run_train(plain)
    ckpt = load_recipe(tmp_path / "r.yaml", common + ["student.gradient_checkpointing=true",
                                                      f"run_dir={tmp_path / 'gc'}", f"cache.dir={plain.cache.dir}"])
    run_train(ckpt)
    a = load_file(Path(plain.run_dir) / "student" / "model.safetensors")
    b = load_file(tmp_path / "gc" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_divergence_stops_before_a_bad_update_and_keeps_finite_checkpoints(cached):
    from safetensors.torch import load_file

    from distill.checkpoint import latest, verify
    from distill.errors import DistillError

    recipe = cached(["train.max_steps=8", "train.lr=1e30", "train.schedule=constant", "train.save_every_steps=1",
                     "train.log_every_steps=100"])
    with pytest.raises(DistillError, match=r"training diverged at step \d+: .*last good checkpoint is "):
        run_train(recipe)
    last = latest(Path(recipe.run_dir) / "checkpoints")
    assert last is not None
    verify(last)
    weights = load_file(next(last.glob("**/model.safetensors")))
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())
