"""The multi-teacher distillation loss the trainer calls: `distill_loss`.

Per selected token t (a response token) with gold next token g_t, teachers
i = 1..N with per-token shares a_it (weighting.token_shares, summing to 1 or 0),
and the student's own logits u_t (its LM head, then its family's transform,
distill/logits.py: Gemma 2's softcap, Cohere's and Granite's scales):

    loss_t = (1 - ce_weight) * T^2 * sum_i a_it * D(P_it || Q_t)  +  ce_weight * CE(g_t)

D is one of divergences.DIVERGENCES on the teacher's k + 1 bins at temperature T
(the student's distribution is softmax(u_t / T)); T^2 keeps the gradient scale
independent of T (Hinton et al.). CE is the plain student cross-entropy on u_t
(temperature 1). `loss_sum` is the sum over tokens; the
trainer divides once by the global token count (STYLE.md, pattern 3).

Positions whose target is IGNORE_INDEX (-100) are padding: they contribute
nothing and are not counted. A real token whose teacher weights are all 0
contributes only ce_weight * CE (so nothing when ce_weight == 0) and is still
counted in n_tokens: the normaliser does not depend on routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distill.config import LossConfig
from distill.logits import IDENTITY, LogitTransform
from distill.loss.chunked import ChunkedDistill, ChunkSpec
from distill.loss.divergences import DIVERGENCES, teacher_log_bins
from distill.loss.weighting import CE_WEIGHTINGS, gold_cross_entropy, sequence_cross_entropy, token_shares

IGNORE_INDEX = -100


@dataclass
class TeacherSignal:
    """Sparse teacher distributions at the M selected (loss-masked) token positions.

    ids [N, M, k] int64 token ids, distinct within a row (N teachers);
    logprobs [N, M, k] log p at temperature 1, normalised so that
    sum(exp(logprobs)) + exp(log_residual) == 1;
    log_residual [N, M] log of the mass outside the top-k (-inf when k == V).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_residual: torch.Tensor


@dataclass
class LossOutput:
    """Sums over tokens; the trainer normalises.

    loss_sum: 0-dim, differentiable, sum over tokens of loss_t.
    n_tokens: tokens whose target is not IGNORE_INDEX.
    teacher_div_sums [N] detached: sum over those tokens of T^2 * D_i, whatever the
        teacher's share (per-teacher mean divergence = this / n_tokens).
    teacher_weight_sums [N] detached: sum of each teacher's share (its weight share =
        this / n_tokens; the shares add up to the number of tokens with a teacher).
    ce_sum: 0-dim detached, sum of the plain CE on the targets (temperature 1).
    """

    loss_sum: torch.Tensor
    n_tokens: int
    teacher_div_sums: torch.Tensor
    teacher_weight_sums: torch.Tensor
    ce_sum: torch.Tensor


def _check_inputs(hidden, head_weight, head_bias, signal, targets, token_weights, sequence_index) -> None:
    if hidden.dim() != 2 or head_weight.dim() != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"hidden [M, H] and head_weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(head_weight.shape)}")
    m, v = hidden.shape[0], head_weight.shape[0]
    if head_bias is not None and tuple(head_bias.shape) != (v,):
        raise ValueError(f"head_bias must be [{v}], got {tuple(head_bias.shape)}")
    if signal.ids.dim() != 3 or signal.ids.shape[1] != m:
        raise ValueError(f"signal.ids must be [N, {m}, k], got {tuple(signal.ids.shape)}")
    n, _, k = signal.ids.shape
    if tuple(signal.logprobs.shape) != (n, m, k) or tuple(signal.log_residual.shape) != (n, m):
        raise ValueError(f"signal.logprobs must be [{n}, {m}, {k}] and log_residual [{n}, {m}], got "
                         f"{tuple(signal.logprobs.shape)} and {tuple(signal.log_residual.shape)}")
    if tuple(targets.shape) != (m,) or tuple(token_weights.shape) != (n, m):
        raise ValueError(f"targets must be [{m}] and token_weights [{n}, {m}], got "
                         f"{tuple(targets.shape)} and {tuple(token_weights.shape)}")
    if sequence_index is not None and (tuple(sequence_index.shape) != (m,) or sequence_index.is_floating_point()):
        raise ValueError(f"sequence_index must be an integer [{m}] tensor, got {sequence_index.dtype} "
                         f"{tuple(sequence_index.shape)}")
    if m == 0:
        return
    # One small reduction each; an out-of-range id would otherwise be a device assert.
    if k > v or int(signal.ids.min()) < 0 or int(signal.ids.max()) >= v:
        raise ValueError(f"teacher ids must be in [0, {v}) with k <= V (k = {k})")
    real = targets[targets != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= v):
        raise ValueError(f"targets must be in [0, {v}) or {IGNORE_INDEX} for padding")
    if not bool(torch.isfinite(token_weights).all()) or bool((token_weights < 0).any()):
        raise ValueError("token_weights must be finite and >= 0")


def distill_loss(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                 signal: TeacherSignal, targets: torch.Tensor, token_weights: torch.Tensor,
                 cfg: LossConfig, *, logit_transform: Optional[LogitTransform] = None,
                 sequence_index: Optional[torch.Tensor] = None) -> LossOutput:
    """Multi-teacher distillation loss through the LM head, chunk by chunk.

    hidden [M, H]: student final hidden states (after the final norm) at the M selected positions.
    head_weight [V, H]: LM head (tied embeddings or a LoRA-effective weight are fine); head_bias [V] or None.
    signal: teachers' sparse distributions at the same positions ([N, M, k]).
    targets [M] int64: gold next tokens, IGNORE_INDEX (-100) at padding.
    token_weights [N, M] >= 0: per-token teacher weights (weighting.example_weights expanded to tokens).
    logit_transform: the student's transform of its head's output (distill.logits.logit_transform(student));
        None is the identity (a Llama-style head). Applied before the temperature; its exact gradient
        is part of the closed-form backward.
    sequence_index [M] int: which sequence (sample) each token belongs to; needed by
        weighting "min_ce_sequence" (ranks teachers per sequence), ignored otherwise.

    Student logits are computed cfg.chunk_size tokens at a time, so peak memory is
    O(chunk_size x V), never O(M x V); gradients flow to hidden, head_weight and head_bias
    and equal those of the dense computation. The head matmuls run in head_weight's
    dtype (hidden is cast to it) or, for an fp32 head under autocast (bf16 compute over fp32
    master weights), in the autocast dtype, as a dense head would, with the head's gradient
    accumulated in fp32 across chunks; softmax maths in fp32 (fp64 for an fp64 head).
    """
    if cfg.divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {cfg.divergence!r} (known: {', '.join(DIVERGENCES)})")
    if logit_transform is not None and not isinstance(logit_transform, LogitTransform):
        raise ValueError(f"logit_transform must be a distill.logits.LogitTransform, got {type(logit_transform)}")
    if cfg.weighting == "min_ce_sequence" and sequence_index is None:
        raise ValueError("weighting 'min_ce_sequence' needs sequence_index (the sequence of each token)")
    _check_inputs(hidden, head_weight, head_bias, signal, targets, token_weights, sequence_index)
    vocab = head_weight.shape[0]
    compute = torch.float64 if head_weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
        ids = signal.ids.long()
        logprobs, log_residual = signal.logprobs.to(compute), signal.log_residual.to(compute)
        logp_bins = teacher_log_bins(logprobs, log_residual, vocab, cfg.temperature)
        ce = None
        if cfg.weighting in CE_WEIGHTINGS:
            ce = gold_cross_entropy(ids, logprobs, log_residual, safe_targets, vocab)
            if cfg.weighting == "min_ce_sequence":
                ce = sequence_cross_entropy(ce, sequence_index, valid)
        shares = token_shares(token_weights.to(compute), ce, cfg.weighting, cfg.weighting_temperature) * valid
        coef = shares * ((1.0 - cfg.ce_weight) * cfg.temperature ** 2)
    device_type = hidden.device.type
    # Autocast is turned off around the loss (its maths is fp32 by design), but its dtype is kept
    # for the head matmuls: an fp32 matmul over [chunk, V] would be the step's slowest on a GPU.
    autocast = head_weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type)
    spec = ChunkSpec(divergence=cfg.divergence, temperature=float(cfg.temperature), beta=float(cfg.beta),
                     skew_alpha=float(cfg.skew_alpha), ce_weight=float(cfg.ce_weight),
                     chunk_size=int(cfg.chunk_size), transform=logit_transform or IDENTITY,
                     matmul_dtype=torch.get_autocast_dtype(device_type) if autocast else None)
    with torch.autocast(device_type=device_type, enabled=False):
        loss_sum, div_sums, ce_sum = ChunkedDistill.apply(hidden, head_weight, head_bias, ids, logp_bins,
                                                          safe_targets, coef, valid.to(compute), spec)
    return LossOutput(loss_sum=loss_sum, n_tokens=int(valid.sum()), teacher_div_sums=div_sums,
                      teacher_weight_sums=shares.sum(1), ce_sum=ce_sum)
