"""Recipes: loading, overrides, placeholders, and one-line errors (exit 2) for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.config import load_recipe
from distill.errors import ConfigError


@pytest.fixture
def base(tmp_path: Path) -> dict:
    for d in ("teacher_a", "teacher_b", "student"):
        (tmp_path / d).mkdir()
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    return {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "teachers": [
            {"name": "a", "model": str(tmp_path / "teacher_a"), "domains": ["math"]},
            {"name": "b", "model": str(tmp_path / "teacher_b"), "domains": ["qa"]},
        ],
        "student": {"model": str(tmp_path / "student")},
        "data": {"sources": [{"path": str(tmp_path / "data.jsonl"), "domain": "math"}]},
        "eval": {"tasks": ["boolq"]},
    }


def write(tmp_path: Path, data: dict, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_recipe_loads_with_defaults_and_overrides(tmp_path, base):
    r = load_recipe(write(tmp_path, base), ["train.lr=3e-4", "teachers.1.weight=2", "loss.divergence=jsd"])
    assert r.train.lr == 3e-4 and r.teachers[1].weight == 2.0 and r.loss.divergence == "jsd"
    assert r.cache.top_k == 48 and r.cache.dir == str(tmp_path / "run" / "cache")  # default + placeholder


def test_run_dir_placeholders(tmp_path, base):
    base["run_dir"] = str(tmp_path / "runs" / "{name}")
    base["cache"] = {"dir": "{run_dir}/mycache"}
    r = load_recipe(write(tmp_path, base))
    assert r.run_dir == str(tmp_path / "runs" / "t")
    assert r.cache.dir == str(tmp_path / "runs" / "t" / "mycache")


def test_smollm2_placeholder_is_materialised_only_when_used(tmp_path, base, monkeypatch):
    import distill.smollm

    calls = []
    monkeypatch.setattr(distill.smollm, "smollm2_path", lambda: calls.append(1) or tmp_path / "student")
    load_recipe(write(tmp_path, base))
    assert calls == []  # a recipe that does not name it never converts the model
    base["student"]["model"] = "{smollm2}"
    base["teachers"][0]["adapter"] = "{smollm2}"
    r = load_recipe(write(tmp_path, base))
    assert r.student.model == r.teachers[0].adapter == str(tmp_path / "student") and calls == [1]


def test_paths_under_run_dir_may_not_exist_yet(tmp_path, base):
    base["teachers"][0]["model"] = "{run_dir}/synthetic/expert"
    assert load_recipe(write(tmp_path, base)).teachers[0].model.endswith("run/synthetic/expert")


def test_hub_ids_are_not_checked_on_disk(tmp_path, base):
    base["teachers"][0]["model"] = "meta-llama/Llama-3.1-8B-Instruct"
    assert load_recipe(write(tmp_path, base)).teachers[0].model == "meta-llama/Llama-3.1-8B-Instruct"


# (mutation of the base recipe, key the error must name)
BAD = [
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d["train"].update(lr="fast") if "train" in d else d.update(train={"lr": "fast"}), "train.lr"),
    (lambda d: d["teachers"][0].pop("model"), "teachers[0].model"),
    (lambda d: d["teachers"][1].update(model="/no/such/teacher"), "teachers[1].model"),
    (lambda d: d.update(train={"budget_minutes": -5}), "train.budget_minutes"),
    (lambda d: d.update(cache={"top_k": 0}), "cache.top_k"),
    (lambda d: d.update(cache={"top_k": -3}), "cache.top_k"),
    (lambda d: d.update(cache={"codec": "fp16"}), "cache.top_k"),  # no default k for fp16
    (lambda d: d.update(cache={"codec": "vk65"}), "cache.codec"),
    (lambda d: d.update(cache={"id_order": "frequency"}), "cache.id_order"),
    (lambda d: d.update(cache={"codec": "ef6", "top_k": 26, "id_order": "teacher"}), "cache.id_order"),
    (lambda d: d.update(cache={"id_order_rows": 0}), "cache.id_order_rows"),
    (lambda d: d["teachers"][1].update(name="a"), "teachers[1].name"),
    (lambda d: d.update(loss={"divergence": "hellinger"}), "loss.divergence"),
    (lambda d: d["data"].update(sources=[]), "data.sources"),
    (lambda d: d.update(teachers=[]), "teachers"),
    (lambda d: d.pop("student"), "student"),
    (lambda d: d.update(loss={"beta": 1.5}), "loss.beta"),
    (lambda d: d.update(loss={"skew_alpha": 0.0}), "loss.skew_alpha"),
    (lambda d: d.update(loss={"weighting": "vote"}), "loss.weighting"),
    (lambda d: d.update(loss={"weighting": "min_ce"}), "loss.weighting"),  # split in two: see the test below
    (lambda d: [t.update(weight=0) for t in d["teachers"]], "teachers"),
    (lambda d: d["teachers"][0].update(weight=-1), "teachers[0].weight"),
    (lambda d: d.update(loss={"weighting": "route"}) or d["data"]["sources"][0].update(domain="code"),
     "data.sources[0].domain"),
    (lambda d: d.update(cache={"codec": "zip"}), "cache.codec"),
    (lambda d: d.update(train={"batch_size": 0}), "train.batch_size"),
    (lambda d: d.update(train={"epochs": 1, "max_steps": -1}), "train.max_steps"),
    (lambda d: d.update(data={"sources": d["data"]["sources"], "max_length": 1}), "data.max_length"),
    (lambda d: d["data"]["sources"][0].update(path=str(Path(d["run_dir"]).parent / "missing.jsonl")),
     "data.sources[0].path"),
    (lambda d: d.update(teachers={"name": "a"}), "teachers"),
    (lambda d: d["student"].update(lora={"r": 0}), "student.lora.r"),
    (lambda d: d.update(eval={"models": [{"name": "avg", "merge": ["a", "zzz"]}]}), "eval.models[0].merge[1]"),
    (lambda d: d.update(eval={"models": [{"name": "avg"}]}), "eval.models[0]"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "method": "ties"}]}),
     "eval.models[0].density"),  # ties needs a density
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "density": 0.5}]}),
     "eval.models[0].density"),  # linear has none
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "method": "dare_ties", "density": 0}]}),
     "eval.models[0].density"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "method": "ties", "density": 0.5}]}),
     "eval.models[0].base"),  # full fine-tunes: task vectors need a base
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "weights": [1, 1]}]}),
     "eval.models[0].base"),  # a linear merge is base-free only when its weights sum to 1
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "weights": [1]}]}),
     "eval.models[0].weights"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "a"]}]}), "eval.models[0].merge[1]"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "majority_sign_method": "total"}]}),
     "eval.models[0].majority_sign_method"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "method": "slerp"}]}),
     "eval.models[0].method"),
    (lambda d: d.update(eval={"models": [{"name": "m", "merge": ["a", "b"], "base": "./nowhere"}]}),
     "eval.models[0].base"),
    (lambda d: d["student"].update(init={"merge": []}), "student.init.merge"),
    (lambda d: d["student"].update(init={"merge": ["a", "zzz"]}), "student.init.merge[1]"),
    (lambda d: d["student"].update(init={"merge": ["a", "b"], "method": "ties"}), "student.init.density"),
    (lambda d: d.update(publish={"push": True}), "publish.repo_id"),
    (lambda d: d.update(train={"budget_minutes": 1, "eval_reserve_minutes": 2}), "train.eval_reserve_minutes"),
    (lambda d: d.update(train={"num_workers": -1}), "train.num_workers"),
    (lambda d: d.update(train={"group_batches": 0}), "train.group_batches"),
    (lambda d: d["student"].update(max_params=-1), "student.max_params"),
    (lambda d: d.update(name=""), "name"),
]


@pytest.mark.parametrize("mutate,key", BAD, ids=[k for _, k in BAD])
def test_bad_recipe_one_line_error_exit_2(tmp_path, base, capsys, mutate, key):
    mutate(base)
    path = write(tmp_path, base)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.key.startswith(key), (info.value.key, key)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("distill: error: ") and key in err, err


def test_retired_min_ce_names_both_replacements(tmp_path, base):
    base["loss"] = {"weighting": "min_ce"}
    with pytest.raises(ConfigError, match="min_ce_sequence .*FuseLLM.*min_ce_token"):
        load_recipe(write(tmp_path, base))
    for weighting in ("min_ce_sequence", "min_ce_token"):
        base["loss"] = {"weighting": weighting}
        assert load_recipe(write(tmp_path, base)).loss.weighting == weighting


def test_bad_override_names_key(tmp_path, base, capsys):
    path = write(tmp_path, base)
    for override, key in [("train.lr=abc", "train.lr"), ("teachers.7.weight=1", "teachers.7"),
                          ("nokey", "nokey"), ("loss.chunk_size=0", "loss.chunk_size")]:
        with pytest.raises(SystemExit) as e:
            main(["validate", str(path), override])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert key in err and "\n" not in err, err


def test_not_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: [a, b\n")
    for path in (bad, tmp_path / "nope.yaml"):
        with pytest.raises(SystemExit) as e:
            main(["validate", str(path)])
        assert e.value.code == 2
        assert "\n" not in capsys.readouterr().err.strip()


def test_cli_subprocess_prints_no_traceback(tmp_path, base):
    base["cache"] = {"top_k": 0}
    path = write(tmp_path, base)
    proc = subprocess.run([sys.executable, "-m", "distill", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"distill: error: {path}: cache.top_k")


def test_validate_prints_resolved_with_origins(tmp_path, base, capsys):
    main_path = write(tmp_path, base)
    with pytest.raises(SystemExit) as e:
        main(["validate", str(main_path), "train.lr=0.01"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train.lr: 0.01  (override)" in out
    assert "cache.top_k: 48  (default)" in out
    assert "student.model:" in out and "(recipe)" in out


def test_every_shipped_recipe_validates():
    root = Path(__file__).parent.parent
    recipes = sorted(root.joinpath("recipes").glob("*.yaml"))
    experiments = sorted(root.joinpath("experiments").glob("*/recipe*.yaml"))
    assert recipes and experiments, "no recipes shipped"
    for p in recipes + experiments:
        load_recipe(p)


def test_top_k_defaults_to_the_codecs_measured_setting(tmp_path, base):
    assert load_recipe(write(tmp_path, base)).cache.top_k == 48
    base["cache"] = {"codec": "hifi"}
    assert load_recipe(write(tmp_path, base)).cache.top_k == 128
    base["cache"] = {"codec": "hifi", "top_k": 100}
    assert load_recipe(write(tmp_path, base)).cache.top_k == 100


def test_id_order_defaults_to_teacher_for_vk_codecs_only(tmp_path, base):
    c = load_recipe(write(tmp_path, base)).cache
    assert (c.id_order, c.id_order_rows) == ("teacher", 256)
    base["cache"] = {"codec": "ef6", "top_k": 26}
    assert load_recipe(write(tmp_path, base)).cache.id_order == "none"
    base["cache"] = {"codec": "hifi", "id_order": "none"}
    assert load_recipe(write(tmp_path, base)).cache.id_order == "none"
