"""Peak device memory per stage, from parameter counts and the recipe's batch shapes.

Bytes per parameter follow what distill actually holds (distill/train.py, student_dtypes):
- no DeepSpeed (one process or DDP, "ZeRO 0"): the trained weights are fp32 master weights
  (4 B), their gradients fp32 (4 B), AdamW's two moments fp32 (8 B); nothing is divided.
- DeepSpeed ZeRO 1/2/3 in bf16: a bf16 copy of the weights (2 B) and bf16 gradients (2 B), and
  the fp32 master weights + moments (12 B) in the optimizer; stage 1 divides the 12 B by the
  number of GPUs, stage 2 the gradients too, stage 3 the weights too (ZeRO paper, Rajbhandari
  et al. 2020). Frozen weights (a LoRA student's base) are divided only under stage 3.
- `train.pure_bf16`: 2 + 2 + 4 B, no master copy.
Activations per token per decoder layer (2 B each under bf16 autocast, 4 B in fp32), saved for backward (SwiGLU MLP, SDPA attention
that keeps no T x T matrix): 2 B x (4h + 2q + 2kv + 4i); with gradient checkpointing only each
layer's input (2h B) is kept, plus one layer recomputed at a time. The loss adds O(chunk x V)
(three fp32 [chunk, V] buffers). A constant OVERHEAD_GIB covers the CUDA context and allocator
slack.
"""

from __future__ import annotations

from distill.plan.params import ParamCount, Shape

GIB = 1 << 30
OVERHEAD_GIB = 1.0
QUANT_BYTES = {"none": None, "8bit": 1.0, "4bit": 0.5 + 4 / 64}  # NF4: 4 bits + an fp32 absmax per 64
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(p: ParamCount, dtype: str, quantization: str = "none") -> float:
    """A model's weights as loaded: bitsandbytes quantizes the decoder linears, never the embedding
    or the head (transformers keeps lm_head in the compute dtype), so those stay in `dtype`."""
    full = DTYPE_BYTES[dtype]
    q = QUANT_BYTES[quantization]
    if q is None:
        return full * p.total
    # per_layer includes its norms (a few thousand weights), counted at the quantized rate
    return q * p.per_layer * p.layers + full * (p.embedding + p.lm_head + p.final_norm)


def layer_activation_bytes(s: Shape, elem: int = 2) -> int:
    """Bytes one token leaves saved for backward in one decoder layer, as the docstring says
    (elem: bytes per activation, 2 under bf16 autocast, 4 in fp32 as on CPU)."""
    return elem * (4 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + 4 * s.intermediate)


def train_activation_bytes(s: Shape, tokens: int, checkpointing: bool, chunk: int, elem: int = 2) -> float:
    """Activations of one micro-batch of `tokens` (padded) tokens, and the chunked loss's buffers."""
    layer = layer_activation_bytes(s, elem)
    if checkpointing:
        acts = tokens * (elem * s.hidden * s.layers + layer)
    else:
        acts = tokens * layer * s.layers
    return acts + 3 * 4 * chunk * s.vocab + 4 * tokens * s.hidden


def optimizer_bytes(trainable: int, frozen: int, zero: int, gpus: int, pure_bf16: bool,
                    frozen_dtype_bytes: int) -> dict:
    """Per-GPU bytes of weights, gradients and AdamW state (see the module docstring)."""
    n = max(gpus, 1)
    if zero == 0:
        w, g, o = (2, 2, 4) if pure_bf16 else (4, 4, 8)
        return {"weights": w * trainable + frozen_dtype_bytes * frozen, "grads": g * trainable,
                "adam": o * trainable}
    w, g, o = 2 * trainable, 2 * trainable, 12 * trainable
    fz = frozen_dtype_bytes * frozen
    return {"weights": (w + fz) / n if zero >= 3 else w + fz, "grads": g / n if zero >= 2 else g, "adam": o / n}


def inference_bytes(s: Shape, batch: int, seq: int, row_chunk: int = 2048) -> float:
    """A teacher forward's transient memory: a layer's activations for the batch, the KV of every layer
    if kept (capture keeps none: it runs without use_cache), and the head's fp32 logits chunk
    (capture's topk works on [row_chunk, V] in fp32, twice over)."""
    tokens = batch * seq
    return tokens * (layer_activation_bytes(s) + 2 * s.hidden) + 2 * 4 * min(row_chunk, tokens) * s.vocab


def kv_cache_bytes(s: Shape, batch: int, seq: int) -> float:
    """Generation's KV cache in bf16: keys and values of every layer."""
    return 2 * 2 * s.layers * s.kv_dim * batch * seq


def gib(x: float) -> float:
    return round(x / GIB, 2)
