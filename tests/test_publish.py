"""Publishing: the model folder reloads as the trained student (full, merged LoRA, LoRA adapter), the
card's metadata round-trips through huggingface_hub, the push calls the Hub API with the recipe's
settings (only HfApi's network methods are mocked), no credential reaches any file or log, and bad
input fails in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill.cli import main
from distill.config import load_recipe
from distill.evaluation.runner import write_scores

FAKE = {"HF_TOKEN": "hf_FAKEtokenAAAAAAAAAAAAAAAAAAAAAAAA",
        "HUGGING_FACE_HUB_TOKEN": "hf_FAKEtokenBBBBBBBBBBBBBBBBBBBBB",
        "WANDB_API_KEY": "wandbFAKEkeyCCCCCCCCCCCCCCCCCCCCCCCCCCCC"}
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _metrics(acc, n, wall, peak, protocol=None):
    m = {"accuracy": acc, "n": n, "wall_s": wall, "examples_per_s": n / wall, "tokens_per_s": 10.0 * n / wall,
         "peak_mem_mb": peak, "version": 1}
    return m | ({"protocol": protocol} if protocol else {})


def _write_run_artifacts(run: Path) -> None:
    """What `distill train` and `distill eval` leave beside the student (their real formats)."""
    (run / "train_result.json").write_text(json.dumps(
        {"steps": 7, "planned_steps": 10, "tokens": 1234, "wall_s": 90.0, "stopped_by": "budget", "final_loss": 0.5}))
    scores = {name: {"boolq": _metrics(acc, 20, 1.5, 300.0, "competition"),
                     "boolq_standard": _metrics(acc - 0.05, 20, 1.25, 310.0, "standard"),
                     "mawps": _metrics(acc / 2, 10, 4.0, 320.0)}
              for name, acc in (("student", 0.75), ("avg", 0.6), ("ta", 0.55), ("tb", 0.5))}
    write_scores(run / "eval", scores, "competition", None)


@pytest.fixture
def run(tiny_world, tmp_path):
    """A full student (the tiny base, its tokenizer given a chat template) with train and eval results."""
    from transformers import AutoTokenizer

    recipe = tiny_recipe(tiny_world, tmp_path / "run", publish={"repo_id": "me/student"},
                         eval={"tasks": ["boolq", "boolq_standard", "mawps"],
                               "models": [{"name": "avg", "merge": ["ta", "tb"]}]})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_world["base"], run_dir / "student")
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(run_dir / "student")
    _write_run_artifacts(run_dir)
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_world, tmp_path_factory):
    """A LoRA student really trained by `distill train` (r=4, lr high enough that the adapter matters)."""
    from distill.cache.capture import run_capture
    from distill.train import run_train

    root = tmp_path_factory.mktemp("lora")
    recipe = tiny_recipe(tiny_world, root / "run", publish={"repo_id": "me/lora-student"},
                         student={"model": str(tiny_world["base"]), "lora": {"r": 4}},
                         train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every_steps": 1})
    path = write_recipe(root / "r.yaml", recipe)
    loaded = load_recipe(path)
    run_capture(loaded)
    run_train(loaded, log=lambda *a: None)
    return path


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 7, 12, 3, 20, 4]])
    with torch.no_grad():
        return model(ids).logits.float()


def _publish(recipe_path: Path, *args: str) -> Path:
    with pytest.raises(SystemExit) as e:
        main(["publish", str(recipe_path), *args])
    assert e.value.code == 0
    return Path(load_recipe(recipe_path).run_dir) / "publish"


def test_full_student_folder_is_complete_and_reloads_identically(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pub = _publish(run, "--dry-run")
    names = {p.name for p in pub.iterdir()}
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    student = run.parent / "run" / "student"
    published = _logits(AutoModelForCausalLM.from_pretrained(pub))
    assert published.equal(_logits(AutoModelForCausalLM.from_pretrained(student)))
    assert AutoTokenizer.from_pretrained(pub).chat_template == TEMPLATE
    assert "README.md" not in {p.name for p in student.iterdir()}  # the student folder is left as trained


def test_lora_student_published_merged_and_as_adapter(lora_run, tiny_world):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = lora_run.parent / "run"
    trained = _logits(AutoModelForCausalLM.from_pretrained(run_dir / "student"))
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_world["base"]))
    assert (trained - base).abs().max() > 1e-4  # the adapter changed the model: the checks below can fail

    merged = _publish(lora_run, "--dry-run")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained, atol=1e-5, rtol=0)

    adapter = _publish(lora_run, "--dry-run", "--format", "adapter")
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["base"]), adapter)
    assert torch.allclose(_logits(peft_model), trained, atol=1e-5, rtol=0)
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.base_model is None and "local model folder `base`" in card.text  # a local base: no Hub id


def test_card_metadata_round_trips_with_eval_results(run):
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(_publish(run, "--dry-run") / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and "distill" in meta["tags"]
    assert ModelCardData(**meta).to_dict() == meta  # the metadata survives a parse of its own output
    (entry,) = meta["model-index"]
    assert entry["name"] == "student" and len(entry["results"]) == 2  # boolq + boolq_standard share their data
    got = {r.metric_config: (r.metric_value, r.metric_args, r.dataset_type) for r in card.data.eval_results}
    assert got == {"boolq": (0.75, {"n": 20, "protocol": "competition"}, "boolq"),
                   "boolq_standard": (0.7, {"n": 20, "protocol": "standard"}, "boolq"),
                   "mawps": (0.375, {"n": 10}, "mawps")}
    assert all(r.metric_type == "accuracy" and r.task_type == "text-generation" for r in card.data.eval_results)
    body = card.text
    assert "| ta | `" in body and "| tb | `" in body and "7/10 optimizer steps" in body and "stopped by budget" in body
    assert "90.0 s (1.5 min)" in body
    # The merge baseline sits beside the student, with its time and memory
    lines = [ln for ln in body.splitlines() if ln.startswith("| ")]
    student_row = next(i for i, ln in enumerate(lines) if ln.startswith("| student | student | boolq |"))
    assert lines[student_row + 3].startswith("| avg | merge baseline (linear of ta, tb) | boolq |")
    assert "| 0.7500 | 20 | 1.5 | 300 |" in lines[student_row]
    assert "Divergence `forward_kl`" in body and "## Recipe" in body and "name: tiny" in body
    assert "github.com" not in card.content and meta["license"] == "unknown"
    assert "<redacted>" not in card.content  # nothing secret here: no ordinary value taken for one


def test_hub_base_and_dataset_ids_reach_the_metadata(tiny_world, tmp_path):
    from distill.model_card import build_card

    recipe = tiny_recipe(tiny_world, tmp_path / "run", student={"model": "HuggingFaceTB/SmolLM2-135M"},
                         data={"sources": [{"path": "someone/calib-data"}, {"path": str(tiny_world["data"])}]})
    card = build_card(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), "merged")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and card.data.datasets == ["someone/calib-data"]
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()  # not evaluated
    assert "Not evaluated" in card.text


@pytest.mark.parametrize("licences,override,expected", [
    (("apache-2.0", "apache-2.0", "apache-2.0"), None, ("apache-2.0", None)),
    (("apache-2.0", "mit", "apache-2.0"), None, ("other", "mixed")),
    (("apache-2.0", None, "apache-2.0"), None, ("unknown", None)),
    (("apache-2.0", "mit", None), "cc-by-4.0", ("cc-by-4.0", None)),
])
def test_licence_from_base_and_teachers(tmp_path, tiny_world, licences, override, expected):
    from distill.model_card import licence

    dirs = []
    for name, lic in zip(("base", "ta", "tb"), licences):
        d = tmp_path / name
        d.mkdir()
        if lic:
            (d / "README.md").write_text(f"---\nlicense: {lic}\n---\n# {name}\n")
        dirs.append(str(d))
    recipe = tiny_recipe(tiny_world, tmp_path / "run", student={"model": dirs[0]},
                         publish={"license": override} if override else {})
    recipe["teachers"][0]["model"], recipe["teachers"][1]["model"] = dirs[1], dirs[2]
    lic, name, lines = licence(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert (lic, name) == expected
    assert sum(ln.startswith("- ") for ln in lines) == 3  # every source listed, whatever the outcome


def test_redact_hides_credential_like_values_only(monkeypatch):
    from distill.secrets import REDACTED, redact

    monkeypatch.setenv("WANDB_API_KEY", FAKE["WANDB_API_KEY"])
    got = redact({"wandb": {"run_name": f"x {FAKE['HF_TOKEN']}", "api_key": "abc", "entity": FAKE["WANDB_API_KEY"]},
                  "cache": {"shard_tokens": 5}, "generate": {"max_new_tokens": 9}, "hub_token": None})
    assert got == {"wandb": {"run_name": f"x {REDACTED}", "api_key": REDACTED, "entity": REDACTED},
                   "cache": {"shard_tokens": 5}, "generate": {"max_new_tokens": 9}, "hub_token": None}


def _mock_hub(monkeypatch, calls: list, fail: Exception | None = None):
    import huggingface_hub

    class Info:
        commit_url = "https://huggingface.co/me/student/commit/abc"

    def create_repo(self, repo_id, **k):
        if fail:
            raise fail
        calls.append(("create_repo", repo_id, k))

    def upload_folder(self, **k):
        calls.append(("upload_folder", sorted(p.name for p in Path(k["folder_path"]).iterdir()), k))
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, repo_id, **k: calls.append(
        ("create_branch", repo_id, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_push_calls_the_hub_with_the_recipe_settings(run, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE["HF_TOKEN"])
    calls: list = []
    _mock_hub(monkeypatch, calls)
    pub = _publish(run, "publish.private=false", "publish.revision=dev", "publish.commit_message=first student")
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == "me/student" and calls[0][2] == {"private": False, "exist_ok": True, "repo_type": "model"}
    assert calls[1][1] == "me/student" and calls[1][2] == {"branch": "dev", "exist_ok": True, "repo_type": "model"}
    files, k = calls[2][1], calls[2][2]
    assert k == {"folder_path": str(pub), "repo_id": "me/student", "repo_type": "model", "revision": "dev",
                 "commit_message": "first student"}
    assert {"README.md", "config.json", "model.safetensors", "generation_config.json"} <= set(files)
    assert "/commit/abc" in capsys.readouterr().out


def test_push_to_main_creates_no_branch_and_defaults_the_message(run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE["HF_TOKEN"])
    calls: list = []
    _mock_hub(monkeypatch, calls)
    _publish(run)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[1][2]["revision"] is None
    assert calls[1][2]["commit_message"] == "distill: tiny"


def test_dry_run_uploads_nothing(run, monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network call in a dry run")

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, boom)
    assert (_publish(run, "--dry-run") / "README.md").exists()


def test_no_credential_in_any_file_or_output(run, monkeypatch, capsys, caplog):
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    calls: list = []
    _mock_hub(monkeypatch, calls)
    _publish(run)
    with pytest.raises(SystemExit):  # a failure whose message quotes the token
        _mock_hub(monkeypatch, calls, fail=RuntimeError(f"401 for token {FAKE['HF_TOKEN']}"))
        main(["publish", str(run)])
    out = capsys.readouterr()
    files = [p for p in (run.parent / "run").rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and len(files) > 10
    texts = [p.read_bytes() for p in files] + [out.out.encode(), out.err.encode(), caplog.text.encode()]
    for secret in FAKE.values():
        assert not any(secret.encode() in t for t in texts), secret
    assert "401 for token <redacted>" in out.err


def test_upload_failure_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE["HF_TOKEN"])
    _mock_hub(monkeypatch, [], fail=RuntimeError("401 Unauthorized\nlong server text"))
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "401 Unauthorized" in err


@pytest.mark.parametrize("args,key", [
    (["publish.repo_id=me/bad id"], "publish.repo_id"),
    (["publish.repo_id=me/x/y"], "publish.repo_id"),
    (["publish.format=zip"], "publish.format"),
    (["--format", "adapter"], "publish.format"),  # a full student has no adapter
    (["publish.revision=bad..branch"], "publish.revision"),
    (["publish.license=Apache 2"], "publish.license"),
    (["publish.repo_id=null"], "publish.repo_id"),  # a push needs a repo
    ([], "no Hugging Face token"),
])
def test_bad_input_is_one_line_exit_2(run, monkeypatch, capsys, args, key):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(run.parent / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(run.parent / "no-token"))
    _mock_hub(monkeypatch, [], fail=AssertionError("no network call on bad input"))
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("distill: error:") and key in err


def test_missing_student_is_one_line(run, capsys):
    shutil.rmtree(run.parent / "run" / "student")
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run), "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no trained student" in err


def test_folder_is_replaced_whole_and_a_failed_publish_keeps_the_old_one(run, monkeypatch):
    import distill.publish

    pub = _publish(run, "--dry-run")
    first = (pub / "README.md").read_text()
    (pub.parent / ".publish.tmp999").mkdir()  # a killed publish's leftover

    def broken(*a, **k):
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(distill.publish, "build_card", broken)
    with pytest.raises(RuntimeError):
        distill.publish.write_folder(load_recipe(run), log=lambda *a: None)
    assert (pub / "README.md").read_text() == first and (pub / "model.safetensors").exists()
    assert not list(pub.parent.glob(".publish*"))  # no half-written folder left beside it


def test_publish_takes_a_run_directory(run):
    _publish(run, "--dry-run")  # writes recipe.resolved.yaml, as every stage does
    run_dir = run.parent / "run"
    shutil.rmtree(run_dir / "publish")
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run_dir), "--dry-run"])
    assert e.value.code == 0 and (run_dir / "publish" / "model.safetensors").exists()
