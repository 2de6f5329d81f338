"""Tiny random-init causal LMs of every model family distill users bring, for tests/test_families.py.

Each family is built from its own transformers config class, 2 layers, hidden 32, over the
synthetic experiment's char tokenizer (42 ids: <pad>=0, <s>=1, </s>=2), with the knobs that make
the family different turned on and small enough to matter on test-sized sequences:

    llama     plain (untied head)
    mistral   sliding window WINDOW on every layer
    qwen2     use_sliding_window, window WINDOW on layer 1 only (max_window_layers=1), qkv bias
    gemma2    final_logit_softcapping SOFTCAP, attention softcapping, sliding layer 0, tied head
    gemma3    sliding layer 0, full layer 1 (Gemma3ForCausalLM, the text-only class), qk-norm, tied
    phi3      fused qkv_proj / gate_up_proj
    cohere    logit_scale LOGIT_SCALE (!= 1), LayerNorm, tied head

Random init gives near-uniform logits (std ~0.1), where every comparison passes trivially.
`build` rescales the LM head until the model's own distributions (after its logit transform)
have a mean entropy of ENTROPY nats: peaked but not one-hot. The softcap then bites (raw
logits well past SOFTCAP), and a skipped logit_scale sharpens them by 1 / LOGIT_SCALE.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "cohere")
WINDOW = 4  # sliding window: shorter than every calibration sample and most prompts in the tests
SOFTCAP = 8.0  # Gemma 2's final_logit_softcapping (30 in the real models)
LOGIT_SCALE = 0.25  # Cohere's logit_scale (0.0625 in Command-R)
ENTROPY = 1.5  # nats: mean entropy of each model's next-token distributions after `build` (uniform: 3.7)
HIDDEN, HEADS, KV_HEADS = 32, 4, 2
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # experiments/synthetic/toy.py build_tokenizer's ids


def family_config(family: str, vocab_size: int):
    """The family's transformers config at test size."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  initializer_range=0.1, **SPECIAL)
    head_dim = HIDDEN // HEADS
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=WINDOW)
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=WINDOW,
                               final_logit_softcapping=SOFTCAP, attn_logit_softcapping=20.0,
                               layer_types=["sliding_attention", "full_attention"])
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                   sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return tf.Phi3Config(**common, original_max_position_embeddings=128)
    if family == "cohere":
        return tf.CohereConfig(**common, logit_scale=LOGIT_SCALE)
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")


def model_class(family: str):
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
            "gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM, "phi3": tf.Phi3ForCausalLM,
            "cohere": tf.CohereForCausalLM}[family]


def _mean_entropy(model, ids: torch.Tensor) -> float:
    logp = model(ids).logits.float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


@torch.no_grad()
def _sharpen(model, vocab_size: int, seed: int) -> None:
    """Scale the LM head so that the model's own next-token distributions on random text have
    mean entropy ENTROPY (with a tied head the input embeddings scale too, and the softcap is not
    linear, so the scale is searched for, not computed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (4, 24), generator=g)
    head = model.get_output_embeddings().weight
    init = head.detach().clone()

    def entropy_at(log2_scale: float) -> float:
        head.copy_(init * 2 ** log2_scale)
        return _mean_entropy(model, ids)

    # Entropy falls as the scale grows, until a softcap saturates many logits at +cap and it rises
    # again: step up to the first crossing, then bisect inside that monotone stretch.
    lo = 0.0
    while entropy_at(lo + 0.5) > ENTROPY:
        lo += 0.5
        if lo > 8:
            raise AssertionError(f"{type(model).__name__}: entropy stays above {ENTROPY} nats")
    hi = lo + 0.5
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy_at(mid) > ENTROPY else (lo, mid)
    got = entropy_at(hi)
    if abs(got - ENTROPY) > 0.1:
        raise AssertionError(f"{type(model).__name__}: mean entropy {got:.2f} nats, wanted ~{ENTROPY}")


def build(family: str, vocab_size: int, seed: int):
    """A random-init model of `family` in eval mode, its logits sharpened (see the module docstring)."""
    torch.manual_seed(seed)
    model = model_class(family)(family_config(family, vocab_size)).eval()
    _sharpen(model, vocab_size, seed)
    return model


def save(model, tok, path: Path) -> Path:
    """model + tokenizer, `from_pretrained`-loadable (safetensors)."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A random LoRA adapter over every linear layer but the head, B != 0 so that it acts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def merged(base_dir: Path, adapter: Path):
    """A fresh copy of the base with the adapter merged into its weights (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload().eval()
