"""Publishing: model card content, dry run, and the Hub upload (only the network call is mocked)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_recipe, write_recipe
from distill.cli import main
from distill.config import load_recipe
from distill.publish import model_card, publish_student


@pytest.fixture
def run(tiny_world, tmp_path):
    recipe = tiny_recipe(tiny_world, tmp_path / "run", publish={"repo_id": "me/student", "push": False})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_world["base"], run_dir / "student")
    (run_dir / "train_result.json").write_text(json.dumps(
        {"steps": 7, "planned_steps": 10, "tokens": 1234, "wall_s": 90.0, "stopped_by": "budget"}))
    (run_dir / "report.md").write_text("# distill report: tiny\n\n| model | add |\n|---|---|\n| student | 0.900 |\n")
    return path


def test_model_card_has_teachers_training_scores_and_no_secrets(run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_should_never_appear")
    card = model_card(load_recipe(run))
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "**ta**" in card and "**tb**" in card and "domains: add" in card
    assert "7/10 optimizer steps" in card and "| student | 0.900 |" in card
    assert "hf_SECRET" not in card


def test_dry_run_writes_card_and_uploads_nothing(run, monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network call in a dry run")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", boom)
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run), "--dry-run"])
    assert e.value.code == 0
    assert (run.parent / "run" / "student" / "README.md").exists()


def test_push_uploads_student_folder(run, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **k: calls.append(("create", repo_id, k["private"])))

    class Info:
        commit_url = "https://huggingface.co/me/student/commit/abc"

    def upload(self, folder_path, repo_id, **k):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload", repo_id, files))
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    url = publish_student(load_recipe(run), log=lambda *a: None)
    assert url.endswith("/commit/abc")
    assert calls[0] == ("create", "me/student", True)
    assert calls[1][0] == "upload" and {"README.md", "config.json", "model.safetensors"} <= set(calls[1][2])


def test_upload_failure_is_one_line(run, monkeypatch, capsys):
    import huggingface_hub

    def fail(self, *a, **k):
        raise RuntimeError("401 Unauthorized\nlong server text")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
    with pytest.raises(SystemExit) as e:
        main(["publish", str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "401 Unauthorized" in err
