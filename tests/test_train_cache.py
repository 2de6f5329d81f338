"""`distill train` checks the cache against the recipe and the student's vocabulary before the student loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _tiny, tiny_recipe, write_recipe
from distill.cache.capture import run_capture
from distill.cache.store import CacheReader
from distill.cli import main
from distill.config import load_recipe
from distill.errors import DistillError
from distill.models import load_tokenizer
from distill.train import check_cache, run_train
from test_cache_tail import naive_fit


@pytest.fixture(scope="module")
def stale(tiny_world, tmp_path_factory):
    """One captured cache, its recipe file and a private copy of the data (so its contents can change)."""
    root = tmp_path_factory.mktemp("stale")
    data = root / "calib.jsonl"
    shutil.copy(tiny_world["data"], data)
    recipe = tiny_recipe(tiny_world, root / "run")
    recipe["data"]["sources"][0]["path"] = str(data)
    path = write_recipe(root / "r.yaml", recipe)
    run_capture(load_recipe(path))
    return {"path": path, "data": data, "root": root}


def _check(stale, overrides=()):
    recipe = load_recipe(stale["path"], list(overrides))
    tok = load_tokenizer(recipe.student.model)
    return check_cache(CacheReader(recipe.cache.dir), recipe, tok)


@pytest.mark.parametrize("override,message", [
    ("teachers.1.model={base}", r"teachers\[1\]\.model: cache has '.*/tb', recipe has '.*/base'"),
    ("teachers.1.revision=abc", r"teachers\[1\]\.revision: cache has None, recipe has 'abc'"),
    ("teachers.0.adapter={root}", r"teachers\[0\]\.adapter: cache has None, recipe has '.*stale"),
    ("teachers.0.quantization=8bit", r"teachers\[0\]\.quantization: cache has 'none', recipe has '8bit'"),
    ("data.sources.0.path={other}", r"data\.sources\[0\]\.path: cache has '.*stale.*/calib.jsonl', recipe has "),
    ("data.sources.0.num_samples=20", r"data\.sources\[0\]\.num_samples: cache has None, recipe has 20"),
    ("data.max_length=16", r"data\.max_length: cache has 32, recipe has 16"),
    ("cache.codec=fp16", r"codec\.name \(cache\.codec\): cache has 'vk64', recipe has 'fp16'"),
    ("cache.top_k=3", r"codec\.k \(cache\.top_k\): cache has 4, recipe has 3"),
])
def test_train_refuses_a_cache_made_from_another_recipe(stale, tiny_world, override, message):
    other = stale["root"] / "other.jsonl"
    shutil.copy(stale["data"], other)
    override = override.format(base=tiny_world["base"], root=stale["root"], other=other)
    with pytest.raises(DistillError, match=message + r".*; rerun `distill cache` with cache.rebuild=true$"):
        run_train(load_recipe(stale["path"], [override]))


def test_train_refuses_a_cache_whose_data_file_changed(stale):
    original = stale["data"].read_bytes()
    try:
        stale["data"].write_bytes(original.replace(b'"1+2="', b'"1+3="'))
        with pytest.raises(DistillError, match=r"data\.sources\[0\]\.path: the file's contents changed since the "
                                               r"cache was made \(sha256 '[0-9a-f]{12}…' in the cache, '[0-9a-f]{12}…'"):
            _check(stale)
    finally:
        stale["data"].write_bytes(original)


def test_unchanged_or_cosmetically_changed_recipe_passes(stale):
    for overrides in ([], ["train.lr=5e-4"], ["teachers.0.weight=3", "loss.divergence=reverse_kl"],
                      ["cache.batch_size=2", "eval.limit=5", "train.max_steps=1"]):
        codec = _check(stale, overrides)
        assert codec.name == "vk64"
    result = run_train(load_recipe(stale["path"], ["train.lr=5e-4", "train.max_steps=1"]))
    assert result.steps == 1


# ---------------------------------------------------------------- vocabularies


def _reference_loss(recipe) -> tuple[float, int]:
    """Step-1 loss from scratch: the student's dense logits, each teacher's decoded rows fitted by the
    rule (naive_fit), the divergence on the k + 1 bins, shares 1/2 (fixed equal weights), token mean.
    Also returns how many decoded rows hold an id the student lacks."""
    from transformers import AutoModelForCausalLM

    reader = CacheReader(recipe.cache.dir)
    codec = reader.codec()
    student = AutoModelForCausalLM.from_pretrained(recipe.student.model).eval()
    V = student.config.vocab_size
    reverse = recipe.loss.divergence == "reverse_kl"
    total, n, lacking = 0.0, 0, 0
    for i in range(len(reader)):
        s = reader.sample(i)
        pos = np.flatnonzero(s["target_mask"]) - 1
        with torch.no_grad():
            q_all = torch.softmax(student(torch.from_numpy(s["input_ids"])[None]).logits[0, pos].double(), -1)
        for t in range(len(reader.teacher_names)):
            ids, lp, res = codec.decode(torch.from_numpy(s["records"][t]))
            lacking += int((ids >= V).any(-1).sum())
            for r in range(len(pos)):
                f_ids, f_lp, f_res = naive_fit(ids[r].tolist(), lp[r].tolist(), float(res[r]), V)
                p = [math.exp(x) for x in f_lp] + [math.exp(f_res)]
                q = [float(q_all[r, j]) for j in f_ids]
                q.append(1.0 - sum(q))
                if reverse:
                    p, q = q, p
                total += 0.5 * sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
        n += len(pos)
    return total / n, lacking


# Teachers with 8 padded rows over a student without: their top-4 often holds a padding id, which
# the student lacks. A student with 8 padded rows over full teacher rows (top_k >= V, residual 0):
# its extra rows are tail mass, at the residual floor, so even reverse KL stays finite.
@pytest.mark.parametrize("padded,top_k,divergence", [("teachers", 4, "forward_kl"), ("student", 64, "reverse_kl")])
def test_padded_vocabulary_rows_train_against_the_reference(tiny_world, tmp_path, padded, top_k, divergence):
    tok = tiny_world["tok"]
    big = len(tok) + 8  # padded embedding rows, as Qwen2.5-7B has over Qwen2.5-0.5B
    recipe = tiny_recipe(tiny_world, tmp_path / "run", cache={"codec": "fp16", "top_k": top_k, "shard_tokens": 200},
                         train={"max_steps": 1, "batch_size": 40, "lr": 1e-3, "log_every_steps": 1},
                         loss={"divergence": divergence})
    if padded == "teachers":
        for i, t in enumerate(recipe["teachers"]):
            t["model"] = str(_tiny(tmp_path / f"t{i}", 11 + i, tok, vocab_size=big))
    else:
        recipe["student"]["model"] = str(_tiny(tmp_path / "student", 0, tok, vocab_size=big))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    run_capture(recipe)
    assert CacheReader(recipe.cache.dir).manifest["codec"]["vocab_size"] == (big if padded == "teachers" else len(tok))
    run_train(recipe)
    logged = json.loads((Path(recipe.run_dir) / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    reference, lacking = _reference_loss(recipe)
    assert (lacking > 0) == (padded == "teachers")
    assert logged == pytest.approx(reference, rel=1e-4)


def test_student_too_small_for_the_tokenizer_is_refused_before_it_loads(tiny_world, tmp_path, capsys):
    tok = tiny_world["tok"]
    small = _tiny(tmp_path / "small", 0, tok, vocab_size=len(tok) - 2)
    (small / "model.safetensors").write_bytes(b"not weights: loading them would fail loudly")
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_capture(load_recipe(path))
    recipe["student"]["model"] = str(small)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert (f"student.model: its vocabulary has {len(tok) - 2} rows, fewer than the tokenizer's {len(tok)} tokens "
            f"(the cache's teachers have {len(tok)} rows)") in err, err
