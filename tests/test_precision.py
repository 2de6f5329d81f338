"""Training precision: fp32 master weights and optimizer state under bf16 autocast (CPU autocast
stands in for a GPU's), the opt-in pure-bf16 mode, and the dtype the student is saved in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import free_port, tiny_recipe, write_recipe
from distill.cache.capture import run_capture
from distill.config import load_recipe
from distill.errors import ConfigError, DistillError
from distill.train import build_student, run_train, student_dtypes

BF16_RUN = ["student.dtype=bfloat16", "train.mixed_precision=bf16"]  # what `auto` loaded on CUDA before


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate's state is a process-wide singleton that refuses a second mixed-precision setting."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def bf16_base(tiny_world, tmp_path_factory):
    """The tiny base stored in bf16, as the checkpoints users bring are."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "base16"
    AutoModelForCausalLM.from_pretrained(tiny_world["base"]).to(torch.bfloat16).save_pretrained(out)
    tiny_world["tok"].save_pretrained(out)
    return out


@pytest.fixture
def recipe_for(tiny_world, bf16_base, tmp_path):
    """recipe_for(name, overrides): a recipe whose student is the bf16 base; one cache for all runs."""
    def make(name, overrides=()):
        rec = tiny_recipe(tiny_world, tmp_path / name, student={"model": str(bf16_base)})
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", rec),
                             list(overrides) + [f"cache.dir={tmp_path / 'cache'}"])
        if not (tmp_path / "cache" / "manifest.json").exists():
            run_capture(recipe)
        return recipe
    return make


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(path.glob("**/*model.safetensors")))  # model. or adapter_model.


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_bf16_student_updates_every_weight_from_fp32_masters(recipe_for, bf16_base):
    """4 AdamW steps at lr 2e-5 from a bf16 checkpoint under bf16 autocast: with bf16 weights
    ~70% never change (each update is below half an ulp); with fp32 masters all of them move.
    The checkpoint holds fp32 weights and fp32 AdamW moments; the student is saved in fp32."""
    from transformers import AutoModelForCausalLM

    recipe = recipe_for("bf16", BF16_RUN + ["train.lr=2e-5", "train.schedule=constant"])
    run_train(recipe)
    run = Path(recipe.run_dir)
    base, student = _weights(bf16_base), _weights(run / "student")
    assert base.keys() == student.keys() and base
    changed = sum(int((student[k].float() != base[k].float()).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    assert changed >= 0.99 * total, f"only {changed / total:.1%} of the weights changed"

    ckpt = next((run / "checkpoints").iterdir())
    assert {v.dtype for v in _weights(ckpt).values()} == {torch.float32}  # the master weights
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    moments = [s[k] for s in state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}

    assert {v.dtype for v in student.values()} == {torch.float32}  # saved as trained (README)
    assert json.loads((run / "student" / "config.json").read_text())["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(run / "student")
    assert reloaded.dtype == torch.float32


def test_bf16_autocast_loss_curve_tracks_fp32(recipe_for):
    """20 steps at lr 1e-2 (the loss falls ~44%), bf16 autocast vs all-fp32, same data order.
    bf16 operands carry 8 significant bits (rounding <= 2^-9 = 0.2% per operand), so one step's
    loss differs by ~0.1% and the weights drift apart slowly: the largest gap measured is 0.45%.
    2% is 4x that, and 1/20 of the fall the curve must show; CE is mixed in (weight 0.5) because
    the random teachers' KL alone is ~1e-3 nats, where any rounding is a large relative error."""
    common = ["train.max_steps=20", "train.lr=1e-2", "train.schedule=constant", "loss.ce_weight=0.5"]
    curves = {}
    for name, extra in (("fp32", ["student.dtype=float32", "train.mixed_precision='no'"]), ("bf16", BF16_RUN)):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        recipe = recipe_for(name, common + extra)
        run_train(recipe)
        curves[name] = torch.tensor(_losses(Path(recipe.run_dir)))
    ref, got = curves["fp32"], curves["bf16"]
    assert len(ref) == len(got) == 20
    assert ref[-1] < 0.7 * ref[0] and got[-1] < 0.7 * got[0], (ref, got)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0)


def test_student_dtype_auto_means_fp32_masters(recipe_for):
    """What `student.dtype: auto` loads on a GPU: (load dtype, trainable dtype) per case."""
    full = recipe_for("a")
    lora = recipe_for("b", ["student.lora.r=4"])
    assert student_dtypes(full, "cuda") == (torch.float32, torch.float32)  # loaded once, straight into fp32
    assert student_dtypes(lora, "cuda") == (torch.bfloat16, torch.float32)  # frozen base bf16, adapters fp32
    assert student_dtypes(lora, "cpu") == (torch.float32, torch.float32)
    assert student_dtypes(recipe_for("c", ["student.dtype=bfloat16"]), "cuda") == (torch.bfloat16, torch.float32)
    # DeepSpeed casts the module to its dtype and keeps fp32 masters itself: load in its dtype, once.
    assert student_dtypes(full, "cuda", ds_dtype=torch.bfloat16) == (torch.bfloat16, None)
    assert student_dtypes(full, "cuda", ds_dtype=torch.float32) == (torch.float32, None)
    pure = recipe_for("d", ["train.pure_bf16=true"])
    assert student_dtypes(pure, "cuda") == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(DistillError, match="train.pure_bf16: DeepSpeed"):
        student_dtypes(pure, "cuda", ds_dtype=torch.bfloat16)


def test_lora_student_keeps_a_bf16_base_and_trains_fp32_adapters(recipe_for, bf16_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = recipe_for("lora", BF16_RUN + ["student.lora.r=4", "train.lr=2e-5", "train.schedule=constant"])
    model = build_student(recipe, "cpu")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    run_train(recipe)
    run = Path(recipe.run_dir)
    adapter = _weights(run / "student_adapter")
    assert adapter and {v.dtype for v in adapter.values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(run / "student")  # merged into the base, in its dtype
    assert merged.dtype == torch.bfloat16
    via_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_base), run / "student_adapter")
    ids = torch.tensor([[1, 5, 6, 16, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits.float(), via_adapter(ids).logits.float(), rtol=0.02, atol=0.02)


def test_pure_bf16_is_opt_in_and_warns(recipe_for):
    recipe = recipe_for("pure", ["train.pure_bf16=true"])
    with pytest.warns(UserWarning, match=r"train.pure_bf16: .*no fp32 master copy.*rounds away"):
        model = build_student(recipe, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="train.pure_bf16"):
        recipe_for("pure32", ["train.pure_bf16=true", "student.dtype=float32"])


@pytest.mark.slow  # two DeepSpeed processes, ~30 s
def test_deepspeed_bf16_keeps_fp32_masters_and_saves_them(recipe_for, bf16_base, tmp_path):
    """launch/zero2.yaml as shipped, bf16 from the recipe: DeepSpeed trains fp32 masters (4 steps at
    lr 2e-5 move every weight) and the student is saved from them in fp32, not from the module's
    bf16 copy (which rounds most of those updates away)."""
    import os
    import shutil
    import subprocess
    import sys

    recipe = recipe_for("ds", ["train.lr=2e-5", "train.schedule=constant", "train.batch_size=2"])
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    root = Path(__file__).resolve().parent.parent
    cmd = [accelerate, "launch", "--config_file", "launch/zero2.yaml", "--num_processes", "2",
           "--main_process_port", free_port(), "-m", "distill", "train", str(tmp_path / "ds.yaml"),
           f"cache.dir={recipe.cache.dir}", "train.lr=2e-5", "train.schedule=constant", "train.batch_size=2",
           "train.mixed_precision=bf16"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "train: DeepSpeed ZeRO-2, 2 processes on cpu, mixed precision bf16" in proc.stdout, proc.stdout[-2000:]
    run = Path(recipe.run_dir)
    base, student = _weights(bf16_base), _weights(run / "student")
    assert base.keys() == student.keys() and {v.dtype for v in student.values()} == {torch.float32}
    changed = sum(int((student[k] != base[k].float()).sum()) for k in base)
    assert changed >= 0.99 * sum(v.numel() for v in base.values())
    assert json.loads((run / "student" / "config.json").read_text())["dtype"] == "float32"
