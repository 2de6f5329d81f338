"""Tiny GGUF files written with the `gguf` package (llama.cpp's writer): real files, no download.

A 2-layer Llama (hidden 32, vocab 40) with a byte-level-style tokenizer and a chat template,
as llama.cpp lays it out (`blk.N.attn_q.weight`, ...); transformers reads it like any GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TOKENS = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)] + ["Ġ", ":"]


def write_tiny_gguf(path: Path, weights: str = "q8_0", tied: bool = True, arch: str = "llama",
                    licence: str | None = None) -> Path:
    """weights: "q8_0" (matrices as Q8_0 blocks, norms f32), "f16" (matrices f16) or "f32".
    tied: no `output.weight`, so the LM head is the embedding. arch: `general.architecture`.
    licence: `general.license`, none by default."""
    import gguf

    vocab, hidden, layers, heads, ff = len(TOKENS), 32, 2, 4, 64
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if licence:
        w.add_license(licence)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (vocab - 2))  # 3 = control
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if len(shape) == 1 or weights == "f32":
            w.add_tensor(name, a)
        elif weights == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quantize(a, q8), raw_dtype=q8)

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    if not tied:
        tensor("output.weight", vocab, hidden)
    for i in range(layers):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{n}.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
