"""The evaluation cache: a rerun scores only what changed, and never trusts a bad entry."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from conftest import tiny_recipe, write_recipe
from distill.cli import main
from distill.config import load_recipe
from distill.evaluation import evaluate_models
from distill.model_entries import eval_entries


@pytest.fixture
def world(tiny_world, tmp_path):
    """A private copy of a tiny model (its bytes get changed), a multiple-choice and a generative task."""
    model = shutil.copytree(tiny_world["ta"], tmp_path / "model")
    rows = [{"q": f"is {i} even?", "label": int(i % 2 == 0), "prompt": f"{i}+1=", "target": str(i + 1)}
            for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text("kind: multiple_choice\ndataset: d.jsonl\nchoices: ['no', 'yes']\n"
                                      "templates: [{name: t, jinja: '{{ q }} ||| {{ answer_choices[label] }}'}]\n")
    (tmp_path / "gen.yaml").write_text("kind: generate_exact\ndataset: d.jsonl\nmax_new_tokens: 3\n")
    recipe = tiny_recipe(tiny_world, tmp_path / "run", eval={
        "tasks": [str(tmp_path / "mc.yaml"), str(tmp_path / "gen.yaml")], "student": False, "teachers": False,
        "models": [{"name": "m", "model": str(model)}], "limit": 4, "batch_size": 2,
        "cache_dir": str(tmp_path / "eval-cache")})
    return {"root": tmp_path, "model": model, "recipe": write_recipe(tmp_path / "r.yaml", recipe)}


def _evaluate(world, out: str, **changes):
    """evaluate_models over the recipe's entries; returns (scores, loads, log lines)."""
    recipe = load_recipe(world["recipe"])
    cfg = replace(recipe.eval, **changes)
    entries, loads, lines = eval_entries(recipe), [], []
    for e in entries:
        e.load = (lambda f: lambda: (loads.append(1), f())[1])(e.load)
    scores = evaluate_models(entries, cfg.tasks, cfg, world["root"] / out, device="cpu", log=lines.append)
    return scores, len(loads), lines


def _strip(scores):
    return {m: {t: {k: v for k, v in x.items() if k not in ("cached", "wall_s", "examples_per_s", "tokens_per_s",
                                                             "peak_mem_mb")} for t, x in per.items()}
            for m, per in scores.items()}


def test_second_run_does_not_load_the_model_and_returns_the_same_scores(world):
    first, loads, _ = _evaluate(world, "a")
    assert loads == 1 and not any(x.get("cached") for x in first["m"].values())
    second, loads, lines = _evaluate(world, "b")  # another run folder: the cache is shared
    assert loads == 0
    assert {t: x["cached"] for t, x in second["m"].items()} == {"mc": True, "gen": True}
    assert second["m"]["mc"] == {**first["m"]["mc"], "cached": True}
    for task in ("mc", "gen"):  # predictions are written from the cache too
        a = (world["root"] / "a" / "m" / f"{task}.predictions.jsonl").read_text()
        assert a and (world["root"] / "b" / "m" / f"{task}.predictions.jsonl").read_text() == a
    assert any("cached" in line for line in lines)


def test_what_changes_the_numbers_rescores(world):
    _evaluate(world, "a")
    # The protocol changes multiple-choice scores only: generation does not read it.
    scores, loads, _ = _evaluate(world, "b", protocol="standard")
    assert loads == 1 and "cached" not in scores["m"]["mc"] and scores["m"]["gen"]["cached"]
    scores, loads, _ = _evaluate(world, "c", limit=3)
    assert loads == 1 and not any(x.get("cached") for x in scores["m"].values())
    scores, loads, _ = _evaluate(world, "d", batch_size=1)
    assert loads == 1 and not any(x.get("cached") for x in scores["m"].values())
    # The task spec: one more generated token.
    gen = world["root"] / "gen.yaml"
    gen.write_text(gen.read_text().replace("max_new_tokens: 3", "max_new_tokens: 4"))
    scores, loads, _ = _evaluate(world, "e")
    assert loads == 1 and "cached" not in scores["m"]["gen"] and scores["m"]["mc"]["cached"]
    # One byte of the weights (same size, so only the content tells).
    weights = world["model"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    scores, loads, _ = _evaluate(world, "f")
    assert loads == 1 and not any(x.get("cached") for x in scores["m"].values())
    # Nothing changed since: all cached again.
    scores, loads, _ = _evaluate(world, "g")
    assert loads == 0


def test_a_task_that_sets_its_own_protocol_keeps_it(world):
    """A spec's `protocol` wins over eval.protocol, in the scores and in the cache key."""
    mc = world["root"] / "mc.yaml"
    (world["root"] / "mc_std.yaml").write_text(mc.read_text() + "protocol: standard\n")
    (world["root"] / "mc_comp.yaml").write_text(mc.read_text() + "protocol: competition\n")
    tasks = [str(world["root"] / f"mc_{p}.yaml") for p in ("std", "comp")]
    first, loads, _ = _evaluate(world, "a", tasks=tasks)
    assert {t: x["protocol"] for t, x in first["m"].items()} == {"mc_std": "standard", "mc_comp": "competition"}
    # two views of the same examples: scored in shared passes, each naming the other
    assert first["m"]["mc_std"]["shared_pass_with"] == ["mc_comp"] and loads == 1
    assert "mc_std: standard" in (world["root"] / "a" / "scores.md").read_text()
    # eval.protocol does not change either task's result: both come from the cache
    second, loads, _ = _evaluate(world, "b", tasks=tasks, protocol="standard")
    assert loads == 0 and _strip(second) == _strip(first)
    # and each equals the plain task scored under that protocol
    plain, _, _ = _evaluate(world, "c", tasks=[str(mc)], protocol="standard")
    assert plain["m"]["mc"]["accuracy"] == first["m"]["mc_std"]["accuracy"]
    assert [json.loads(x)["scores"] for x in (world["root"] / "c/m/mc.predictions.jsonl").read_text().splitlines()] \
        == [json.loads(x)["scores"] for x in (world["root"] / "a/m/mc_std.predictions.jsonl").read_text().splitlines()]


def test_config_or_tokenizer_change_rescores(world):
    _evaluate(world, "a")
    for name in ("config.json", "tokenizer.json"):  # still valid JSON, one byte longer
        path = world["model"] / name
        path.write_text(path.read_text() + "\n")
        assert _evaluate(world, name)[1] == 1
    (world["model"] / "README.md").write_text("a model card is not read by loading\n")
    assert _evaluate(world, "readme")[1] == 0


@pytest.mark.parametrize("damage", ["truncate", "flip_prediction", "not_json"])
def test_corrupt_entry_is_ignored_with_a_warning(world, damage):
    first, _, _ = _evaluate(world, "a")
    entries = sorted((world["root"] / "eval-cache" / "results").glob("*.json"))
    assert len(entries) == 2
    for path in entries:
        text = path.read_text()
        if damage == "truncate":
            path.write_text(text[: len(text) // 2])
        elif damage == "flip_prediction":  # still valid, believable JSON: only the sha256 tells
            entry = json.loads(text)
            entry["records"][0]["correct"] = not entry["records"][0]["correct"]
            path.write_text(json.dumps(entry))
        else:
            path.write_bytes(b"\x00garbage")
    scores, loads, lines = _evaluate(world, "b")
    assert loads == 1 and _strip(scores) == _strip(first)
    warnings = [x for x in lines if x.startswith("warning: eval cache entry")]
    assert len(warnings) == 2 and all("scoring again" in w for w in warnings)
    # The entries were rewritten: the next run is served from them.
    assert _evaluate(world, "c")[1] == 0


def test_switch_off(world, capsys):
    _evaluate(world, "a")
    assert _evaluate(world, "b", cache=False)[1] == 1
    with pytest.raises(SystemExit) as e:
        main(["eval", str(world["recipe"]), "--no-eval-cache"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "eval m mc: accuracy" in out and "cached" not in out
    assert "cache: false" in (world["root"] / "run" / "recipe.resolved.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(world["recipe"])])
    assert e.value.code == 0 and "eval m mc: accuracy" in capsys.readouterr().out
    assert json.loads((world["root"] / "run" / "eval" / "scores.json").read_text())["m"]["mc"]["cached"]
