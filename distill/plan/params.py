"""Parameter counts from model configs alone (no weights): what the planner's FLOPs and bytes start from.

    shape = read_shape("meta-llama/Llama-2-7b-hf", config_dir="recipes/configs")
    count_params(shape).total          # 6,738,415,616 for Llama-2-7B
    lora_params(shape, read_adapter(...))

A config is read from, in order: `<config_dir>/<ref>/config.json` (a local mirror of the Hub's
file layout, for planning offline), the local folder `ref`, or the Hub through
`transformers.AutoConfig` (which downloads config.json only). Supported: decoder-only Llama-style
families (llama, mistral, qwen2, gemma, gemma2); their layers differ only in attention biases,
head_dim and the number of norms, which is all this module needs to know.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

# model_type -> (q/k/v bias, norms per layer). Gemma 2 adds pre/post feed-forward norms.
FAMILIES = {"llama": (False, 2), "mistral": (False, 2), "qwen2": (True, 2), "gemma": (False, 2),
            "gemma2": (False, 4)}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The few architecture numbers every estimate uses."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    attention_bias: bool = False  # llama's attention_bias: q, k, v and o all get biases
    mlp_bias: bool = False
    norms_per_layer: int = 2

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """Each decoder linear's (in, out) features."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    per_layer: int
    layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def decoder(self) -> int:
        """Parameters a token's forward multiplies through (embedding lookups are free)."""
        return self.per_layer * self.layers + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.decoder + self.lm_head


def shape_from_config(cfg, where: str) -> Shape:
    """A Shape from a transformers config object (text config of a multimodal one)."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        raise DistillError(f"{where}: cannot count parameters of model_type {kind!r} "
                           f"(known: {', '.join(sorted(FAMILIES))})")
    qkv_bias, norms = FAMILIES[kind]
    heads = int(cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(model_type=kind, hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers), heads=heads,
                 kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=int(hd),
                 intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size),
                 tied=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=qkv_bias,
                 attention_bias=bool(getattr(cfg, "attention_bias", False)) and kind != "qwen2",
                 mlp_bias=bool(getattr(cfg, "mlp_bias", False)), norms_per_layer=norms)


def count_params(s: Shape) -> ParamCount:
    """Exact parameter count of the family's `*ForCausalLM` built from the config (tested against numel)."""
    h = s.hidden
    attn = 2 * h * s.q_dim + 2 * h * s.kv_dim  # q, o and k, v (GQA: fewer k/v heads)
    if s.qkv_bias:
        attn += s.q_dim + 2 * s.kv_dim
    if s.attention_bias:
        attn += s.q_dim + 2 * s.kv_dim + h
    mlp = 3 * h * s.intermediate + (2 * s.intermediate + h if s.mlp_bias else 0)  # SwiGLU: gate, up, down
    per_layer = attn + mlp + s.norms_per_layer * h
    return ParamCount(embedding=s.vocab * h, per_layer=per_layer, layers=s.layers, final_norm=h,
                      lm_head=0 if s.tied else s.vocab * h)


def _local_dir(ref: str, config_dir: str | None, file: str) -> Path | None:
    """Where `file` of `ref` is on disk: the config-dir mirror first, then the folder itself."""
    candidates = [Path(config_dir) / ref] if config_dir else []
    candidates.append(Path(os.path.expanduser(ref)))
    return next((c for c in candidates if (c / file).is_file()), None)


def _offline_hint(ref: str, file: str) -> str:
    return (f"cannot read {file} of {ref!r} (not a local folder and the Hub could not be reached); "
            f"pass --config-dir DIR holding DIR/{ref}/{file}, a copy of the published file")


def read_shape(ref: str, *, revision: str | None = None, config_dir: str | None = None,
               trust_remote_code: bool = False, what: str = "model") -> Shape:
    """The architecture of `ref` from its config.json only (see the module docstring for where from)."""
    from transformers import AutoConfig

    local = _local_dir(ref, config_dir, "config.json")
    try:
        cfg = AutoConfig.from_pretrained(str(local) if local else ref, revision=None if local else revision,
                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if local:
            raise DistillError(f"{what}: {local / 'config.json'}: unreadable ({str(exc)[:150]})") from None
        raise DistillError(f"{what}: {_offline_hint(ref, 'config.json')}") from None
    return shape_from_config(cfg, what)


def read_adapter(ref: str, *, config_dir: str | None = None, what: str = "adapter") -> dict:
    """An adapter's adapter_config.json as a dict (local mirror, local folder, or the Hub: that file only)."""
    local = _local_dir(ref, config_dir, "adapter_config.json")
    try:
        if local is None:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(ref, "adapter_config.json")).parent
        return json.loads((local / "adapter_config.json").read_text())
    except Exception as exc:  # the Hub client raises many types offline; all mean the same here
        if local is not None:
            raise DistillError(f"{what}: {local / 'adapter_config.json'}: unreadable ({str(exc)[:150]})") from None
        raise DistillError(f"{what}: {_offline_hint(ref, 'adapter_config.json')}") from None


def _targeted(name: str, layer: int, targets, adapter: dict) -> bool:
    """Whether peft puts an adapter on decoder linear `name` of `layer` (list, regex or all-linear)."""
    layers = adapter.get("layers_to_transform")
    if layers is not None and layer not in ([layers] if isinstance(layers, int) else layers):
        return False
    if targets == "all-linear":
        return True
    if isinstance(targets, str):  # peft: a string is a full-match regex over the module's full name
        full = f"model.layers.{layer}.{'mlp' if name in LINEAR[4:] else 'self_attn'}.{name}"
        return re.fullmatch(targets, full) is not None
    return name in targets


def lora_params(s: Shape, adapter: dict) -> int:
    """Trainable parameters of a LoRA adapter: r * (in + out) per targeted linear (rank_pattern honoured)."""
    if adapter.get("peft_type", "LORA") != "LORA":
        raise DistillError(f"adapter: peft_type {adapter.get('peft_type')!r}: only LoRA adapters are planned")
    targets = adapter.get("target_modules") or []
    ranks = adapter.get("rank_pattern") or {}
    total = 0
    for layer in range(s.layers):
        for name, (fan_in, fan_out) in s.linear_dims().items():
            if _targeted(name, layer, targets, adapter):
                r = next((v for k, v in ranks.items() if re.search(k, f"layers.{layer}.{name}")), adapter["r"])
                total += r * (fan_in + fan_out)
    return total


def lora_student_params(s: Shape, r: int, target_modules: list[str]) -> int:
    """The recipe's `student.lora` adapter, counted like a saved one."""
    return lora_params(s, {"r": r, "target_modules": list(target_modules)})
