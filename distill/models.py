"""Loading models and tokenizers from local paths or Hub ids, safely.

Weights are read through safetensors only (`use_safetensors=True`) and
`trust_remote_code` stays off unless the recipe asks. A path that does not
exist locally is treated as a Hub id; when that cannot be resolved either
(offline, typo) the user gets one line naming the value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from distill.errors import DistillError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere; a torch.dtype is returned as it is."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        on_cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
        return torch.bfloat16 if on_cuda else torch.float32
    return _DTYPES[name]


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(ref))


def _check_ref(ref: str, what: str) -> str:
    """Local paths must exist; anything else is passed on as a Hub id."""
    path = os.path.expanduser(ref)
    if _looks_local(ref) and not os.path.exists(path):
        raise DistillError(f"{what}: model path {ref!r} does not exist")
    return path if os.path.exists(path) else ref


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


def _hub_error(ref: str, what: str, exc: Exception) -> DistillError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.path.exists(os.path.expanduser(ref)):
        return DistillError(f"{what}: cannot load {ref!r} (unreadable or corrupt files: {first[:200]})")
    return DistillError(f"{what}: cannot load {ref!r} (not a local model folder, and the Hub said: {first[:200]})")


def load_tokenizer(ref: str, *, revision: str | None = None, gguf_file: str | None = None,
                   trust_remote_code: bool = False, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    src = _check_ref(ref, what)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, gguf_file=gguf_file,
                                            trust_remote_code=trust_remote_code)
    except _load_errors() as exc:
        raise _remote_code_error(ref, what, exc) or _hub_error(ref, what, exc) from None
    if tok.pad_token is None:
        # Padding is only ever masked out; EOS is the conventional stand-in.
        tok.pad_token = tok.eos_token
    return tok


PICKLE_HINT = ("distill reads weights through safetensors only (unpickling runs code): convert them, or set "
               "allow_pickle: true in the recipe for a source you trust")


def _refuse_pickle_only(src: str, ref: str, what: str) -> None:
    """A local model folder with pickle weights and no safetensors is refused by name (transformers
    would say only that model.safetensors is missing)."""
    folder = Path(src)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            raise DistillError(f"{what}: {ref!r} holds its weights only as a pickle ({pickles[0]}); {PICKLE_HINT}")


def _remote_code_error(ref: str, what: str, exc: Exception) -> DistillError | None:
    if "trust_remote_code" in str(exc):
        return DistillError(f"{what}: {ref!r} needs its own Python code to load (auto_map); distill runs none "
                            "unless the recipe sets trust_remote_code: true (only for a source you trust)")
    return None


def load_model(ref: str, *, revision: str | None = None, gguf_file: str | None = None,
               dtype: str | torch.dtype = "auto", quantization: str = "none", adapter: str | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False, device: torch.device | str | None = None,
               what: str = "model"):
    """A causal LM ready for inference or training; LoRA `adapter` attached (not merged) when given.

    `quantization` 4bit (NF4, computing in `dtype`) / 8bit (LLM.int8) loads through bitsandbytes,
    straight onto `device` (a quantized model cannot be moved after loading)."""
    from transformers import AutoModelForCausalLM

    src = _check_ref(ref, what)
    if not (allow_pickle or gguf_file):
        _refuse_pickle_only(src, ref, what)
    if os.path.isdir(src):  # a student distill saved is sealed: a damaged file is named, not loaded
        from distill.checkpoint import verify_if_sealed

        verify_if_sealed(Path(src), f"model folder of {what}")
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code,
                    "dtype": resolve_dtype(dtype, device)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:  # None: safetensors when there are any, else transformers' own (weights-only) pickle loader
        kwargs["use_safetensors"] = None if allow_pickle else True
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, kwargs["dtype"], what)
        if device is not None:
            # bitsandbytes quantizes the weights where they load and the result cannot be moved
            # afterwards; without a device_map transformers would pick the current CUDA device.
            kwargs["device_map"] = torch.device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except _load_errors() as exc:
        raise _remote_code_error(ref, what, exc) or _hub_error(ref, what, exc) from None
    if device is not None and quantization == "none":
        model.to(device)
    if quantization == "4bit":
        _check_cpu_4bit(model, what)
    if adapter:
        model = attach_adapter(model, adapter, name="default", what=what, allow_pickle=allow_pickle)
    return model


class _FirstOnly(logging.Filter):
    """Passes the first record of `prefix`, drops its repeats (other records pass)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def _bnb_config(quantization: str, dtype: torch.dtype, what: str):
    """The BitsAndBytesConfig for `quantization` (4bit: NF4 computing in `dtype`; 8bit: LLM.int8)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DistillError(f"{what}: quantization: {quantization} needs bitsandbytes "
                           "(pip install 'distill[quant]')") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    # Every 8-bit matmul on non-fp16 inputs logs this warning: thousands of identical lines a capture.
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in log.filters):
        log.addFilter(_FirstOnly(_INT8_CAST))
    return BitsAndBytesConfig(load_in_8bit=True)


def _check_cpu_4bit(model, what: str) -> None:
    """Refuse a 4-bit model whose layer shapes bitsandbytes cannot run on this CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight at its first inference
    forward, which needs in_features a multiple of the quantization block (64) and out_features
    a multiple of 32; other shapes fail there with a reshape traceback. Real LLMs' shapes fit."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit) or m.weight.device.type != "cpu":
            continue
        block = m.weight.quant_state.blocksize
        if (m.in_features % block or m.out_features % 32) and has_avx512bf16():
            raise DistillError(f"{what}: quantization: 4bit cannot run on this CPU: bitsandbytes needs each "
                               f"layer's input size a multiple of {block} and output size a multiple of 32, and "
                               f"{name} is {m.in_features} -> {m.out_features} (use 8bit, none, or a GPU)")


def adapter_source(ref: str, what: str, allow_pickle: bool = False) -> str:
    """A local folder to load the LoRA adapter `ref` (path or Hub id) from, with its weights in
    safetensors unless `allow_pickle` (peft would otherwise fall back to a pickle adapter_model.bin,
    and unpickling runs code). A Hub adapter is fetched without its pickle files."""
    src = _check_ref(ref, what)
    if allow_pickle:
        return src
    if not os.path.isdir(src):
        from huggingface_hub import snapshot_download

        try:
            src = snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.md"])
        except Exception as exc:  # offline, a typo, no access: one line naming the value
            raise _hub_error(ref, what, exc) from None
    if not (Path(src) / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in Path(src).glob("*.bin")) if os.path.isdir(ref) else []
        held = f"holds its weights only as a pickle ({pickles[0]})" if pickles else "has no adapter_model.safetensors"
        raise DistillError(f"{what}: {ref!r} {held}; {PICKLE_HINT}")
    return src


def attach_adapter(model, adapter: str, *, name: str, what: str = "adapter", allow_pickle: bool = False):
    """Attach a PEFT LoRA adapter (path or Hub id) under `name`, without merging."""
    from peft import PeftModel

    src = adapter_source(adapter, what, allow_pickle)
    try:
        if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
            model.load_adapter(src, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, src, adapter_name=name)
    except _load_errors() as exc:
        raise _hub_error(adapter, what, exc) from None


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_param_limit(model, limit: float, what: str = "student") -> int:
    n = count_parameters(model)
    if n > limit:
        raise DistillError(f"{what}: {n / 1e9:.2f}B parameters exceeds student.max_params={limit / 1e9:.2f}B")
    return n


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary and special tokens: two tokenizers that encode alike match."""
    h = hashlib.sha256()
    vocab = tok.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def config_vocab_size(ref: str, *, revision: str | None = None, gguf_file: str | None = None,
                      trust_remote_code: bool = False, what: str = "model") -> int:
    """A model's vocabulary size (rows of its output embedding) from its config alone, before any weights load."""
    from transformers import AutoConfig

    src = _check_ref(ref, what)
    try:
        cfg = AutoConfig.from_pretrained(src, revision=revision, gguf_file=gguf_file,
                                         trust_remote_code=trust_remote_code)
    except _load_errors() as exc:
        raise _remote_code_error(ref, what, exc) or DistillError(f"{what}: cannot read config of {ref!r} "
                                                                 f"({str(exc)[:150]})") from None
    return int(cfg.get_text_config().vocab_size)


def model_vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def save_pretrained(model, tokenizer, out: Path, seal: bool = False) -> None:
    """Save model (safetensors) + tokenizer atomically: tmp folder, then rename. `seal`: with a
    CHECKSUMS.json of every file (a trained student), which loading it checks."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if seal:
        from distill.checkpoint import seal as seal_folder

        seal_folder(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
