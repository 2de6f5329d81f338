"""Untrusted artifacts (docs/reliability.md): pickle weights and remote code are refused unless the
recipe opts in, no credential reaches any file a run writes or its output, and no name in a recipe,
task spec, manifest or checkpoint can make distill read or write outside where it should."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE = {"HF_TOKEN": "hf_FAKEtokenAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "WANDB_API_KEY": "wandbFAKEkeyCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
        "MY_SERVICE_TOKEN": "svcFAKEsecretDDDDDDDDDDDD"}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------- pickle weights


def _pickle_copy(src: Path, dst: Path) -> Path:
    """`src` with its weights as a pickle (pytorch_model.bin), as older Hub repos hold them."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def test_pickle_teacher_is_refused_unless_the_recipe_allows_it(tiny_world, tmp_path, capsys):
    bad = _pickle_copy(tiny_world["tb"], tmp_path / "pickled")
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(bad)
    code, _, err = _run(["cache", str(write_recipe(tmp_path / "r.yaml", recipe))], capsys)
    line = _one_error(err)
    assert code == 2 and "teacher tb" in line and "pytorch_model.bin" in line and "allow_pickle" in line, line
    assert not (tmp_path / "run" / "cache" / "manifest.json").exists() or \
        not json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["complete"]
    code, _, err = _run(["cache", str(write_recipe(tmp_path / "r2.yaml", dict(recipe, allow_pickle=True)))], capsys)
    assert code == 0, err[-2000:]


def test_pickle_adapter_is_refused_unless_the_recipe_allows_it(tiny_world, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_world["base"]),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    recipe["teachers"][1].update(model=str(tiny_world["base"]), adapter=str(tmp_path / "adapter"))
    code, _, err = _run(["cache", str(write_recipe(tmp_path / "r.yaml", recipe))], capsys)
    line = _one_error(err)
    assert code == 2 and "teacher tb adapter" in line and "adapter_model.bin" in line, line
    code, _, err = _run(["cache", str(write_recipe(tmp_path / "r2.yaml", dict(recipe, allow_pickle=True)))], capsys)
    assert code == 0, err[-2000:]


# ---------------------------------------------------------------- remote code


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_remote_code_never_runs_unless_the_recipe_trusts_it(tiny_world, tmp_path, capsys, model_type):
    """A model folder whose config maps the Auto classes to its own module (which would write a file
    when imported): the module never runs. A known model_type loads with transformers' own class;
    an unknown one is refused in one line naming trust_remote_code."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_world["tb"], folder)
    marker = tmp_path / "remote_code_ran"
    (folder / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(folder)
    code, _, err = _run(["cache", str(write_recipe(tmp_path / "r.yaml", recipe))], capsys)
    if model_type == "evil":
        line = _one_error(err)
        assert code == 2 and "teachers[1].model" in line and "trust_remote_code: true" in line, line
    else:
        assert code == 0, err[-2000:]
    assert not marker.exists()


# ---------------------------------------------------------------- credentials


def test_no_credential_in_any_file_or_output_of_a_whole_run(tiny_world, tmp_path, capsys, monkeypatch):
    """Fake tokens in the environment, a run through every stage (cache, train with W&B offline, eval,
    publish to a folder) and a failing command whose input quotes a token: no file under the run
    (W&B's own files included) and no output holds any of them."""
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [{"prompt": f"{i}+1=", "target": str(i + 1)} for i in range(4)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "inc.yaml").write_text("kind: generate_exact\ndataset: t.jsonl\nmax_new_tokens: 2\n")
    recipe = tiny_recipe(tiny_world, tmp_path / "run", eval={"tasks": [str(tmp_path / "inc.yaml")], "teachers": False},
                         wandb={"enabled": True, "mode": "offline", "project": "distill-test"},
                         publish={"repo_id": "me/student", "license": "mit"})
    recipe["train"]["max_steps"] = 2
    path = write_recipe(tmp_path / "r.yaml", recipe)
    texts = []
    for argv in (["run", str(path)], ["publish", str(path), "--dry-run"]):
        code, out, err = _run(argv, capsys)
        assert code == 0, err[-3000:]
        texts += [out, err]
    # a value the user pasted a token into: the error quotes it
    bad = dict(recipe, run_dir=str(tmp_path / "bad"))
    bad["teachers"] = [dict(recipe["teachers"][0], model=f"./models/{FAKE['HF_TOKEN']}"), recipe["teachers"][1]]
    code, out, err = _run(["cache", str(write_recipe(tmp_path / "bad.yaml", bad))], capsys)
    assert code == 2 and "<redacted>" in _one_error(err)
    texts += [out, err]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("r.yaml", "bad.yaml")]
    assert any("wandb" in p.parts for p in files), "W&B wrote no files: the check would prove nothing"
    assert any(p.name == "recipe.resolved.yaml" for p in files) and any(p.name == "README.md" for p in files)
    for secret in FAKE.values():
        assert not any(secret in t for t in texts), secret
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, (secret, leaked)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("case", ["eval_model_name", "task_name", "recipe_name", "checksum_entry"])
def test_no_name_reaches_outside_its_folder(tiny_world, tmp_path, capsys, case):
    outside = tmp_path / "escape"
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    if case == "eval_model_name":
        recipe["eval"] = {"tasks": ["boolq"], "models": [{"name": "../../escape", "model": str(tiny_world["base"])}]}
        expect = "eval.models[0].name"
    elif case == "task_name":
        (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "1+1=", "target": "2"}) + "\n")
        (tmp_path / "inc.yaml").write_text("name: ../../../escape\nkind: generate_exact\ndataset: t.jsonl\n")
        recipe["eval"] = {"tasks": [str(tmp_path / "inc.yaml")], "student": False}
        expect = "inc.yaml: name"
    elif case == "recipe_name":
        recipe["name"] = "../escape"
        del recipe["run_dir"]
        expect = "name:"
    if case != "checksum_entry":
        code, _, err = _run(["eval" if "eval" in recipe else "cache", str(write_recipe(tmp_path / "r.yaml", recipe))],
                            capsys)
        assert code == 2 and expect in _one_error(err), err[-2000:]
    else:  # a checkpoint whose CHECKSUMS.json names a file outside it is not read
        from distill.checkpoint import verify
        from distill.errors import DistillError
        from distill.files import write_json_atomic

        folder = tmp_path / "run" / "checkpoints" / "step-00000001"
        folder.mkdir(parents=True)
        (tmp_path / "secret.txt").write_text("not a checkpoint file")
        write_json_atomic(folder / "CHECKSUMS.json", {"../../../secret.txt": {"bytes": 21, "sha256": "0" * 64}})
        with pytest.raises(DistillError, match="CHECKSUMS.json: corrupt checksum list"):
            verify(folder)
    assert not outside.exists() and not list(tmp_path.glob("**/escape*"))
