"""A model's own logits from its final hidden states: the LM head, then the family's transform.

Several families change the LM head's output z = W·h (+ b) before it becomes the logits
their `forward` returns (transformers 5.x modeling files):

    Gemma 2 / 3, VaultGemma, NanoChat   c · tanh(z / c), c = config.final_logit_softcapping (when set)
    RecurrentGemma                      the same with c = config.logits_soft_cap
    Cohere, Cohere 2 (+ MoE)            z · config.logit_scale
    Granite (+ MoE, shared, SWA)        z / config.logits_scaling
    MiniCPM3                            z / config.logits_scaling (it scales h; its head has no bias)
    HyperCLOVA X                        z · config.logits_scaling

Every such transform is one `LogitTransform`: u = c · tanh(a · z / c) with a softcap c, or
u = a · z without one (a = scale). Capture (teacher_topk), the chunked loss (which applies
it, then the temperature, and backpropagates through it in closed form) and anything else
that turns hidden states into logits take it from `logit_transform(model)`, so the student
is trained on, and the teachers are cached as, the logits the models produce at inference.

A model type outside the table whose config sets one of the keys above is refused: the same
key means different things in different families (Granite divides by `logits_scaling`,
HyperCLOVA X multiplies), so guessing would cache or train on wrong distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distill.errors import DistillError


@dataclass(frozen=True)
class LogitTransform:
    """u = softcap · tanh(scale · z / softcap) when softcap is set, else u = scale · z.

    z is the LM head's output, u the model's logits; both [..., V].
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"logit scale must be finite and > 0, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"logit softcap must be finite and > 0, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The model's logits for head output z [..., V], out of place (autograd-safe)."""
        u = z * self.scale if self.scale != 1.0 else z
        return u if self.softcap is None else torch.tanh(u / self.softcap) * self.softcap

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """In place: z [..., V] (head output) becomes the model's logits; returns z."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            # The same three steps as the modeling files (divide, tanh, multiply).
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def softcap_grad_(self, u: torch.Tensor) -> torch.Tensor:
        """In place: the model's logits u [..., V] become du/dz = scale · (1 - (u / softcap)²); returns u.

        With a softcap, tanh' = 1 - tanh², and tanh = u / softcap, so the derivative is read
        off the logits themselves (as autograd's tanh backward does). Without one, du/dz is
        the constant `scale`.
        """
        if self.softcap is None:
            raise ValueError("softcap_grad_ needs a softcap; without one du/dz is the constant scale")
        u.div_(self.softcap).square_().neg_().add_(1.0)
        return u if self.scale == 1.0 else u.mul_(self.scale)


IDENTITY = LogitTransform()


def _softcap(key: str) -> Callable:
    return lambda cfg: LogitTransform(softcap=getattr(cfg, key, None) or None)


def _times(key: str) -> Callable:
    return lambda cfg: LogitTransform(scale=float(getattr(cfg, key)))


def _divided_by(key: str) -> Callable:
    return lambda cfg: LogitTransform(scale=1.0 / float(getattr(cfg, key)))


# model_type of the text config -> its transform, read from each family's ForCausalLM.forward
# (transformers 5.24). tests/test_logits.py checks every entry against the real model.
FAMILIES: dict[str, Callable] = {
    "gemma2": _softcap("final_logit_softcapping"),
    "gemma3_text": _softcap("final_logit_softcapping"),
    "vaultgemma": _softcap("final_logit_softcapping"),
    "nanochat": _softcap("final_logit_softcapping"),
    "cohere": _times("logit_scale"),
    "cohere2": _times("logit_scale"),
    "cohere2_moe": _times("logit_scale"),
    "granite": _divided_by("logits_scaling"),
    "granitemoe": _divided_by("logits_scaling"),
    "granitemoeshared": _divided_by("logits_scaling"),
    "granite_swa": _divided_by("logits_scaling"),
    "granitemoe_swa": _divided_by("logits_scaling"),
    "hyperclovax": _times("logits_scaling"),  # multiplies, unlike Granite
    "minicpm3": _divided_by("logits_scaling"),  # divides the hidden states; its head has no bias: the same
    "recurrent_gemma": _softcap("logits_soft_cap"),
    "mpt": lambda cfg: IDENTITY,  # MptForCausalLM does not apply config.logit_scale
}

# Config keys that some family applies to the head's output; set to a non-trivial value on a
# model type missing from FAMILIES, they mean a transform distill does not know.
TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                  "output_logit_soft_cap", "output_multiplier", "logits_mup_width_multiplier")


def _trivial(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and float(value) in (0.0, 1.0))


def logit_transform(model) -> LogitTransform:
    """The transform between `model`'s LM head and its logits, from its (text) config.

    model: a transformers model (peft-wrapped is fine: its config is the base's) or its config.
    Raises DistillError for a model type outside FAMILIES whose config sets a key of
    TRANSFORM_KEYS (e.g. Gemma 3n, whose `hidden_states[-1]` through its head is not its logits, or
    xLSTM): distill would otherwise use logits the model does not produce.
    """
    cfg = getattr(model, "config", model).get_text_config()
    model_type = getattr(cfg, "model_type", None)
    rule = FAMILIES.get(model_type)
    if rule is not None:
        return rule(cfg)
    unknown = {k: getattr(cfg, k) for k in TRANSFORM_KEYS if not _trivial(getattr(cfg, k, None))}
    if unknown:
        keys = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
        raise DistillError(f"model_type {model_type!r} ({type(cfg).__name__}) sets {keys}: a transform of the "
                           f"LM head's output distill does not know (known families: {', '.join(sorted(FAMILIES))})")
    return IDENTITY


# Vocabulary rows of a low-precision head upcast at a time by model_logits(fp32=True) (~30 MB at
# H = 4096), so the fp32 copy of the head never exists whole.
HEAD_CHUNK = 2048


def model_logits(model, hidden: torch.Tensor, transform: Optional[LogitTransform] = None,
                 fp32: bool = False) -> torch.Tensor:
    """The logits [..., V] `model` would return for final hidden states hidden [..., H] (after the final norm).

    transform: logit_transform(model) when None. Identity: the head's output in its dtype. Otherwise
    the transform runs in fp32 (fp64 for an fp64 head): bf16 tanh loses digits near saturation.

    fp32=True (evaluation): the head itself runs in fp32, a HEAD_CHUNK of vocabulary rows at a
    time (bf16 weights and states upcast exactly, fp32 accumulation and output). A bf16 logit
    near 16 is rounded to a multiple of 0.125, coarser than the gap between two BoolQ choices'
    scores, and that rounding depends on the batch's shape. A head that is not a plain Linear
    (quantized, adapted) runs its own forward, upcast after.
    """
    transform = logit_transform(model) if transform is None else transform
    head = model.get_output_embeddings()
    if not fp32:
        z = head(hidden)
    elif type(head) is not torch.nn.Linear:
        z = head(hidden).float()
    elif head.weight.dtype == torch.float32:
        z = head(hidden.float())
    else:
        h = hidden.float()
        z = torch.cat([torch.nn.functional.linear(h, w.float()) for w in head.weight.split(HEAD_CHUNK)], dim=-1)
        if head.bias is not None:
            z += head.bias.float()
    if transform.is_identity:
        return z
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    # In place saves two [..., V] buffers in capture; autograd needs tanh's output kept intact.
    return transform.apply(z) if z.requires_grad else transform.apply_(z)


def decoder(model):
    """The model's decoder body (embeddings, layers, final norm), whose last hidden state the LM head reads.

    `get_decoder()`, except where that returns the LM itself (Llama 4's `base_model_prefix` names
    no attribute of Llama4ForCausalLM): then its `model`.
    """
    body = model.get_decoder()
    if body.get_output_embeddings() is not None and hasattr(body, "model"):
        body = body.model
    return body
