"""A GGUF causal LM as a plain safetensors model folder: `distill import-gguf FILE OUT`.

transformers reads GGUF files of the architectures its GGUF integration knows
(Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...), dequantizing every weight, but
refuses to `save_pretrained` the result (it counts as a quantized model). So we
load it, build the same class from its config with `AutoModelForCausalLM.from_config`
(without the GGUF `quantization_config`), copy the state dict in strictly, check the
tied embeddings, and save that model with the GGUF's tokenizer (chat template
included) and generation config.

    distill import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    distill import-gguf model.gguf out/ --dtype bfloat16 --force

    from distill.gguf import import_gguf
    path = import_gguf("model.gguf", "out")     # -> Path("out")

dtype: `auto` (the default) keeps the file's own float type: float32 for a file with
quantized blocks (Q4_1, Q8_0, ...: they are dequantized to float32, so the saved
model's logits equal the GGUF-loaded model's exactly), float16/bfloat16 for a file
written in that type. `float32`, `bfloat16` or `float16` casts every weight.

The folder is written under a temporary name beside OUT and renamed when complete
(its last file is `distill_gguf.json`, naming the source), so an interrupted
conversion never leaves a folder that looks complete. Peak memory is about twice
the model's size in the chosen dtype (the GGUF-loaded model and its copy).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError

# Written last into the folder; its presence marks a complete conversion.
MARKER = "distill_gguf.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_MAGIC = b"GGUF"


def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "auto", force: bool = False,
                reuse: bool = False) -> Path:
    """Convert the GGUF file `gguf` into the safetensors folder `out`, atomically; returns `out`.

    force: replace a non-empty `out` (by default that is a DistillError).
    reuse: a complete conversion already in `out` (its marker present, now or when ours
    finishes, e.g. from a concurrent process) is kept and returned as it is.
    """
    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise DistillError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if reuse and (out / MARKER).is_file():
        return out
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        saved_dtype = convert(gguf, tmp, dtype)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf.resolve()), "bytes": gguf.stat().st_size,
                                              "dtype": saved_dtype}, indent=1) + "\n")
        if reuse and (out / MARKER).is_file():  # another process finished while we converted
            return out
        _check_out(out, force)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            # Lost a race to a concurrent conversion; with `reuse` its copy is as good as ours.
            if not (reuse and (out / MARKER).is_file()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DistillError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DistillError(f"{out}: folder exists and is not empty (pass --force to replace it)")


def read_config(gguf: Path):
    """The transformers config of a GGUF causal LM; DistillError if it is not one transformers reads."""
    from transformers import AutoConfig, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not gguf.is_file():
        raise DistillError(f"{gguf}: no such file (expected a .gguf model file)")
    with open(gguf, "rb") as f:
        if f.read(4) != _MAGIC:
            raise DistillError(f"{gguf}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        # Unknown architectures and truncated metadata both end here; the reason is the library's.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"{gguf}: transformers {__version__} cannot read this GGUF: {reason}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise DistillError(f"{gguf}: a {config.model_type} model, not a causal LM transformers can load "
                           f"with AutoModelForCausalLM")
    return config


def convert(gguf: Path, out: Path, dtype: str = "auto") -> str:
    """Write the dequantized model, tokenizer and generation config of `gguf` into the folder `out`.

    Not atomic (`import_gguf` is). Returns the saved dtype's name, e.g. "float32"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(gguf)
    read_config(gguf)  # one-line errors before the (slow) weight load
    folder, name = str(gguf.parent), gguf.name
    # dequantize=True: a plain dense model, even where GGUF matmul kernels could keep the blocks packed.
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True),
        dtype=file_dtype(gguf) if dtype == "auto" else getattr(torch, dtype))
    model = plain_copy(loaded)
    del loaded
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    write_card(gguf, out)
    return str(model.dtype).removeprefix("torch.")


def gguf_licence(gguf: Path) -> str | None:
    """The file's `general.license` metadata (e.g. "apache-2.0"), or None when it has none."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("general.license")
    if field is None or not field.data:
        return None
    value = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace").strip()
    return value or None


def write_card(gguf: Path, out: Path) -> None:
    """A README.md model card naming the source file and, when the GGUF states one, its licence in the
    front matter, where `distill publish` reads each source model's licence (distill.model_card)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=gguf_licence(gguf), library_name="transformers")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\nConverted from `{gguf.name}` by `distill import-gguf`: "
              "every weight dequantized, no quantization config.\n").save(out / "README.md")


def file_dtype(gguf: Path):
    """The float type `gguf` was written in (f16/bf16/f32); float32 if it holds quantized blocks."""
    import torch
    # transformers' own header reader (pinned version); its from_pretrained(dtype="auto") applies
    # this only to the architectures of its newer GGUF loader, not to Llama & co.
    from transformers.integrations.gguf.reader import GgufHeader

    return GgufHeader.from_file(str(gguf)).dtype or torch.float32


def plain_copy(loaded):
    """The GGUF-loaded `loaded` as a fresh model of the same class, with no quantization_config."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = ""
    dtype = loaded.dtype
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # strict: every weight comes from the GGUF and none is left over.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tied and outp is not None and outp.weight is not inp.weight:
        raise RuntimeError(f"{type(model).__name__}: tie_word_embeddings is set but the LM head is not tied")
    if outp is not None and not torch.equal(outp.weight, loaded.get_output_embeddings().weight):
        raise RuntimeError(f"{type(model).__name__}: the LM head differs from the GGUF-loaded model's")
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()
