"""Teacher-generated responses for prompt-only data, on tiny real models: real generation, no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, tiny_recipe, write_recipe
from distill.files import sha256_file
from distill.cache import store
from distill.cache import manifest as mf
from distill.cache.capture import run_capture
from distill.cache.codec import make_codec
from distill.cache.generate import generate_prompts, nucleus
from distill.cli import main
from distill.config import load_recipe
from distill.data import load_samples
from distill.errors import CacheError, ConfigError, DistillError

EOS = 2


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory) -> dict:
    """tiny_world plus `tb_eos` (tb with a loud EOS embedding: some responses stop early) and prompts."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gen")
    model = AutoModelForCausalLM.from_pretrained(tiny_world["tb"])
    with torch.no_grad():
        model.model.embed_tokens.weight[EOS] *= 8  # tied: the output row too
    model.save_pretrained(root / "tb_eos")
    tiny_world["tok"].save_pretrained(root / "tb_eos")
    rows = [{"prompt": f"{i}+{i + 1}=", "domain": "add" if i % 2 else "rev"} for i in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**tiny_world, "tb_eos": root / "tb_eos", "prompts": root / "prompts.jsonl", "rows": rows}


def _recipe(world, run_dir: Path, generate=None, **sections) -> dict:
    sections.setdefault("cache", {"top_k": 4, "batch_size": 16, "shard_tokens": 120})  # 2 shards
    r = tiny_recipe(world, run_dir, **sections)
    r["teachers"][1]["model"] = str(world["tb_eos"])  # ta serves add, tb (eos-heavy) serves rev
    gen = {"max_new_tokens": 6} if generate is None else generate
    r["data"] = {"sources": [{"path": str(world["prompts"]), "domain_field": "domain", "generate": gen}],
                 "max_length": 32}
    return r


def _capture(world, tmp_path, name="r", generate=None, overrides=(), **sections):
    path = write_recipe(tmp_path / f"{name}.yaml", _recipe(world, tmp_path / name, generate, **sections))
    recipe = load_recipe(path, list(overrides))
    return recipe, run_capture(recipe)


def _samples(recipe) -> list[dict]:
    reader = store.CacheReader(recipe.cache.dir)
    return [reader.sample(i) for i in range(len(reader))]


def _digest(cache_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(cache_dir)): sha256_file(p) for p in sorted(cache_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # .lock, .capture.lock


def _greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, eos_token_id=EOS,
                         pad_token_id=0)[0, len(prompt_ids):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


def test_greedy_responses_are_the_routed_teachers_and_every_teacher_scores_them(world, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe, report = _capture(world, tmp_path, cache={"top_k": 4, "batch_size": 5, "shard_tokens": 100,
                                                      "codec": "fp16"})
    models = {"ta": AutoModelForCausalLM.from_pretrained(world["ta"]).eval(),
              "tb": AutoModelForCausalLM.from_pretrained(world["tb_eos"]).eval()}
    codec = make_codec("fp16", 4, len(world["tok"]))
    samples = _samples(recipe)
    assert len(samples) == 16 and report.generated == 16
    stopped = 0
    for row, s in zip(world["rows"], samples):
        prompt = world["tok"](row["prompt"])["input_ids"]
        routed = models["ta" if row["domain"] == "add" else "tb"]
        with torch.no_grad():
            response = _greedy(routed, prompt, 6)
        assert s["input_ids"].tolist() == prompt + response
        assert s["target_mask"].tolist() == [False] * len(prompt) + [True] * len(response)
        stopped += response[-1] == EOS
        # Every teacher's rows are its distribution over these very tokens, at the response positions.
        pos = np.flatnonzero(s["target_mask"]) - 1
        for t, model in enumerate(models.values()):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.from_numpy(s["input_ids"])[None]).logits[0, pos], -1)
            ids, logprobs, _ = codec.decode(torch.from_numpy(s["records"][t]))
            assert torch.equal(ids, lp.topk(4, dim=-1).indices)
            assert torch.allclose(logprobs, lp.topk(4, dim=-1).values, atol=2e-3)
    assert 0 < stopped < 16  # both kinds of ending happen
    m = mf.read_manifest(Path(recipe.cache.dir))
    assert f"16 responses generated, {16 - stopped} hit max_new_tokens" in m["data"]["summary"]
    assert m["data"]["generation"]["hit_eos"] == stopped
    assert report.model_loads == 3  # ta and tb to generate; tb stays loaded and is captured first, then ta


def test_sampling_is_seeded_and_independent_of_batching(world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["ta"]).eval()

    def responses(batch_size: int, **gen) -> list[list[int]]:
        recipe = _recipe(world, tmp_path / "run", {"teacher": "ta", "max_new_tokens": 6, **gen})
        cfg = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
        samples, _ = load_samples(world["tok"], cfg.data, cfg.teachers,
                                  lambda prompts: generate_prompts(model, prompts, batch_size, 0, [EOS]))
        return [s.input_ids for s in samples]

    sampled = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 1}
    a = responses(8, **sampled)
    assert responses(3, **sampled) == a  # same seed, other batches: same responses
    assert responses(8, **{**sampled, "seed": 2}) != a
    assert responses(8) != a  # greedy differs: it did sample


def test_nucleus_keeps_the_smallest_set_with_top_p_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.allclose(nucleus(logits, 0.7), torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert torch.allclose(nucleus(logits, 0.8), torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert torch.allclose(nucleus(logits, 0.81), torch.tensor([0.5, 0.3, 0.15, 0.0]))
    assert torch.allclose(nucleus(logits, 0.1), torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert torch.allclose(nucleus(logits, 1.0), logits.exp())


def test_rerun_and_resume_do_not_regenerate(world, tmp_path):
    # Sampled: a resumed run must regenerate a missing chunk exactly.
    recipe, _ = _capture(world, tmp_path, generate={"max_new_tokens": 6, "do_sample": True, "seed": 4})
    cache_dir = Path(recipe.cache.dir)
    before = _digest(cache_dir)
    assert sorted(p.name for p in (cache_dir / "generated").iterdir()) == ["meta.json", "ta-00000.jsonl",
                                                                           "tb-00000.jsonl"]
    again = run_capture(recipe)
    assert again.generated == 0 and again.model_loads == 0 and _digest(cache_dir) == before
    # Killed during generation: tb's chunk and everything after it are missing.
    for p in cache_dir.glob("shard-*"):
        shutil.rmtree(p)
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "generated" / "tb-00000.jsonl").unlink()
    (cache_dir / "generated" / "tb-00000.jsonl.tmp99").write_text("half")
    resumed = run_capture(recipe)
    assert resumed.generated == 8 and _digest(cache_dir) == before
    # Killed during capture: nothing to generate, only the missing teacher file to write.
    manifest = mf.read_manifest(cache_dir)
    shard = sorted(manifest["shards"])[0]
    del manifest["shards"][shard]["files"][mf.teacher_file("ta")]
    manifest["complete"] = False
    mf.write_manifest(cache_dir, manifest)
    resumed = run_capture(recipe)
    assert resumed.generated == 0 and resumed.model_loads == 1 and _digest(cache_dir) == before


def test_changed_generation_is_refused_unless_rebuild_and_kept_across_other_rebuilds(world, tmp_path):
    recipe, _ = _capture(world, tmp_path)
    cache_dir = Path(recipe.cache.dir)
    with pytest.raises(CacheError, match=r"different generated responses \(fingerprint, settings\)"):
        _capture(world, tmp_path, generate={"max_new_tokens": 4})
    with pytest.raises(CacheError, match="different generated responses"):
        _capture(world, tmp_path, generate={"max_new_tokens": 6, "teacher": "ta"})
    assert mf.read_manifest(cache_dir)["complete"]  # refused before touching anything
    _, rebuilt = _capture(world, tmp_path, generate={"max_new_tokens": 4}, overrides=["cache.rebuild=true"])
    assert rebuilt.generated == 16
    assert all(len(s["input_ids"]) - int(np.argmax(s["target_mask"])) <= 4 for s in _samples(recipe))
    # A rebuild for another reason (the codec) keeps the responses: they still match the recipe.
    _, other = _capture(world, tmp_path, generate={"max_new_tokens": 4},
                        overrides=["cache.rebuild=true", "cache.top_k=3"])
    assert other.generated == 0 and mf.read_manifest(cache_dir)["codec"]["k"] == 3


def test_lora_teachers_generate_with_their_adapter_on_one_base(world, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, name in ((5, "lora_add"), (6, "lora_rev")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(world["base"])
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(tmp_path / name)
    recipe = _recipe(world, tmp_path / "run", cache={"top_k": 4, "batch_size": 8, "shard_tokens": 200})
    recipe["data"]["sources"][0]["num_samples"] = 6
    recipe["teachers"] = [{"name": "la", "model": str(world["base"]), "adapter": str(tmp_path / "lora_add"),
                           "domains": ["add"]},
                          {"name": "lb", "model": str(world["base"]), "adapter": str(tmp_path / "lora_rev"),
                           "domains": ["rev"]}]
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    report = run_capture(loaded)
    assert report.model_loads == 1  # one base for generation and capture of both experts
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["base"]), tmp_path / "lora_add",
                                      adapter_name="la").eval()
    model.load_adapter(tmp_path / "lora_rev", adapter_name="lb")
    differs = 0
    for row, s in zip(world["rows"], _samples(loaded)):
        prompt = world["tok"](row["prompt"])["input_ids"]
        model.set_adapter("la" if row["domain"] == "add" else "lb")
        with torch.no_grad():
            assert s["input_ids"].tolist() == prompt + _greedy(model, prompt, 6)
            with model.disable_adapter():
                differs += s["input_ids"].tolist() != prompt + _greedy(model, prompt, 6)
    assert differs > 0  # the adapters matter


def test_chat_prompts_and_max_length_budget(world, tmp_path):
    """Chat-format prompts end with the generation prompt; a response never runs past data.max_length."""
    from transformers import AutoModelForCausalLM

    tok = type(world["tok"]).from_pretrained(world["ta"])
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}={% endfor %}" \
                        "{% if add_generation_prompt %}a:{% endif %}"
    rows = [{"messages": [{"role": "user", "content": "1" * n}]} for n in (2, 9, 13, 30)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(world, tmp_path / "run")
    recipe["data"] = {"sources": [{"path": str(tmp_path / "chat.jsonl"), "format": "chat", "domain": "add",
                                   "generate": {"max_new_tokens": 8}}], "max_length": 20}
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    model = AutoModelForCausalLM.from_pretrained(world["ta"]).eval()
    samples, stats = load_samples(tok, cfg.data, cfg.teachers,
                                  lambda prompts: generate_prompts(model, prompts, 4, 0, [EOS]))
    prompt0 = tok.apply_chat_template(rows[0]["messages"], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    assert tok.decode(prompt0) == "u:11=a:"
    assert samples[0].input_ids[:len(prompt0)] == prompt0
    assert all(len(s.input_ids) <= 20 for s in samples)
    # Prompts of 7, 14, 18, 35 tokens: row 0 runs to max_new_tokens, rows 1 and 2 to max_length
    # (truncated), row 3 fills max_length on its own (truncated, and dropped: no room for a response).
    assert [len(s.input_ids) for s in samples] == [7 + 8, 20, 20] and EOS not in samples[0].input_ids
    assert (stats.generated, stats.hit_max_new_tokens, stats.truncated, stats.dropped) == (3, 1, 3, 1)


# (mutation of the generating source or recipe, key the error must name)
BAD = [
    (lambda r, s: s["generate"].update(teacher="nobody"), "data.sources[0].generate.teacher"),
    (lambda r, s: s["generate"].update(max_new_tokens=0), "data.sources[0].generate.max_new_tokens"),
    (lambda r, s: s["generate"].update(temperature=0.7), "data.sources[0].generate.temperature"),
    (lambda r, s: s["generate"].update(do_sample=True, top_p=0), "data.sources[0].generate.top_p"),
    (lambda r, s: s["generate"].update(do_sample=True, temperature=-1), "data.sources[0].generate.temperature"),
    (lambda r, s: s["generate"].update(greedy=True), "data.sources[0].generate.greedy"),
    (lambda r, s: s.update(format="text"), "data.sources[0].generate"),
    (lambda r, s: s.pop("domain_field") and s.update(domain="code"), "data.sources[0].generate.teacher"),
    (lambda r, s: s.pop("domain_field"), "data.sources[0].generate.teacher"),  # untagged, no generalist
]


@pytest.mark.parametrize("mutate,key", BAD, ids=[k + str(i) for i, (_, k) in enumerate(BAD)])
def test_bad_generate_keys_one_line_error_exit_2(world, tmp_path, capsys, mutate, key):
    recipe = _recipe(world, tmp_path / "run")
    mutate(recipe, recipe["data"]["sources"][0])
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.key == key
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and key in err, err


def test_generalist_or_named_teacher_makes_routing_valid(world, tmp_path):
    recipe = _recipe(world, tmp_path / "run")
    del recipe["data"]["sources"][0]["domain_field"]
    recipe["data"]["sources"][0]["generate"]["teacher"] = "tb"
    load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    recipe["data"]["sources"][0]["generate"].pop("teacher")
    recipe["teachers"][1]["domains"] = []  # tb serves every domain
    load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_row_tag_no_teacher_serves_is_named_before_any_model_loads(world, tmp_path):
    rows = world["rows"] + [{"prompt": "9+9=", "domain": "code"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(world, tmp_path / "run")
    recipe["data"]["sources"][0]["path"] = str(tmp_path / "p.jsonl")
    with pytest.raises(DistillError, match=r"data.sources\[0\].generate.teacher: line 17 has domain 'code'"):
        run_capture(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert not (tmp_path / "run" / "cache").exists()


@pytest.mark.slow
def test_two_process_generation_and_capture_equal_one_process(world, tmp_path):
    """Ranks split the generation chunks (one teacher each here) and the shards: same bytes as one process."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    gen = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.2, "seed": 3}
    paths = {}
    for name in ("one", "two"):
        recipe = _recipe(world, tmp_path / name, gen)
        recipe["data"]["sources"].append({"path": str(world["prompts"]), "domain_field": "domain", "num_samples": 6,
                                          "generate": {"max_new_tokens": 5}})
        paths[name] = write_recipe(tmp_path / f"{name}.yaml", recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "distill", "cache", str(paths["one"])], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                           free_port(), "-m", "distill", "cache", str(paths["two"])], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(env, ACCELERATE_USE_CPU="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _digest(tmp_path / "one" / "cache"), _digest(tmp_path / "two" / "cache")
    assert len([k for k in one if k.startswith("generated/")]) == 3 and one == two
    assert json.loads((tmp_path / "two" / "cache" / "generated" / "meta.json").read_text())["prompts"] == 22
