"""How much each teacher counts at each token.

Two steps. `example_weights` (per sample, called by the data pipeline) turns the
recipe's fixed teacher weights into [N, B] weights, zeroing teachers that do not
serve a sample's domain when weighting == "route". The trainer expands them to
the sample's tokens. `token_shares` (per token, inside the loss) normalises them
over teachers so that each token's shares sum to 1 (or are all 0):

    fixed, route     share_i = w_i / sum_j w_j
    min_ce_sequence  FuseLLM's MinCE (Wan et al., 2024, "Knowledge Fusion of Large Language
                     Models", ICLR, arXiv:2401.10491): per sequence (one sample, one text),
                     the teacher(s) whose distributions have the lowest cross-entropy over
                     the whole sequence take every token of it
    min_ce_token     per token, the teacher(s) with the lowest cross-entropy on the gold
                     token take the token
    soft_ce          share_i ∝ w_i * exp(-CE_i / weighting_temperature)

In both MinCE variants ties split in proportion to w, and a teacher with w == 0 at a
token never wins it (with the trainer's per-sample weights: a teacher with weight 0
for a sample never wins that sample). The fixed weights act as a prior in the
confidence weightings (with equal weights soft_ce is a plain softmax of
-CE / temperature over the teachers with w > 0; it tends to min_ce_token as the
temperature -> 0 and to fixed as it -> inf). A token whose weights are all 0 gets
no shares: only its CE term counts.

A teacher's cross-entropy on the gold token g (temperature 1, `gold_cross_entropy`):
-log p(g) when g is in its top-k; otherwise its residual mass R is taken as spread
uniformly over the V - k tokens outside the top-k, so CE = -log(R / (V - k)) (+inf
when R == 0). The same uniform-tail assumption tempers the residual bin
(divergences.teacher_log_bins).

A teacher's sequence cross-entropy (`sequence_cross_entropy`, for min_ce_sequence):
the sum of its gold-token CE over the sequence's target tokens (padding excluded),
+inf if any of them is +inf. Every teacher is scored on the same tokens, so the sum
ranks teachers exactly as the per-token mean over the sequence would. The trainer passes
whole samples to the loss, so "the sequence" is the whole sample.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

WEIGHTINGS = ("fixed", "route", "min_ce_sequence", "min_ce_token", "soft_ce")
CE_WEIGHTINGS = ("min_ce_sequence", "min_ce_token", "soft_ce")  # the ones that need the teachers' CE


def example_weights(teacher_weights: list[float], teacher_domains: list[list[str]],
                    sample_domains: list[Optional[str]], weighting: str) -> torch.Tensor:
    """[N, B] non-negative per-example teacher weights (float32).

    The fixed weights, times the routing mask when weighting == "route": teacher i
    serves sample b when its domain list is empty, when the sample has no tag
    (None), or when the tag is in the list. A sample no teacher serves gets all
    zeros, so it is trained by the CE term only (config.validate refuses recipes
    where a source's fixed tag is served by no teacher).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")
    if len(teacher_weights) != len(teacher_domains):
        raise ValueError(f"{len(teacher_weights)} teacher weights but {len(teacher_domains)} domain lists")
    if any(w < 0 or not math.isfinite(w) for w in teacher_weights):
        raise ValueError(f"teacher weights must be finite and >= 0, got {teacher_weights}")
    w = torch.tensor(teacher_weights, dtype=torch.float32).unsqueeze(1).repeat(1, len(sample_domains))
    if weighting == "route":
        mask = torch.tensor([[not doms or tag is None or tag in doms for tag in sample_domains]
                             for doms in teacher_domains], dtype=torch.float32)
        w = w * mask.reshape(w.shape)
    return w


def gold_cross_entropy(ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor,
                       targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, M] each teacher's cross-entropy on the gold token (temperature 1).

    ids, logprobs [N, M, k]; log_residual [N, M]; targets [M] (any value at padding).
    Outside the top-k the residual is spread uniformly over the other V - k tokens.
    """
    k = ids.shape[-1]
    hit = ids == targets.view(1, -1, 1)
    in_top = torch.where(hit, logprobs, torch.zeros_like(logprobs)).sum(-1)
    if k < vocab_size:
        tail = log_residual - math.log(vocab_size - k)
    else:
        tail = torch.full_like(log_residual, float("-inf"))
    return -torch.where(hit.any(-1), in_top, tail)


def sequence_cross_entropy(gold_ce: torch.Tensor, sequence_index: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """[N, M] at each token, each teacher's gold-token CE summed over the valid tokens of its sequence.

    gold_ce [N, M] (gold_cross_entropy); sequence_index [M] any integer ids (equal id = same
    sequence); valid [M] bool (False at padding: not summed). +inf where a summed CE is +inf.
    The sums are fp64 products with the [M, S] membership matrix, one teacher at a time: the
    same deterministic op on the same shapes (no atomics, no TF32), so teachers with identical
    CEs get bit-identical sums and tie, on CPU and GPU alike.
    """
    ids, seq = torch.unique(sequence_index, return_inverse=True)  # ids -> 0..S-1 (one host sync)
    n_seq = len(ids)
    member = ((seq[:, None] == torch.arange(n_seq, device=seq.device)[None, :]) & valid[:, None]).double()
    finite = torch.isfinite(gold_ce)
    finite_ce = torch.where(finite, gold_ce, torch.zeros_like(gold_ce)).double()
    sums = finite_ce.new_zeros(len(gold_ce), n_seq)
    for i in range(len(gold_ce)):
        sums[i] = finite_ce[i] @ member
    n_inf = (~finite).double() @ member  # [N, S] counts: exact in any order
    per_seq = torch.where(n_inf > 0, torch.full_like(sums, float("inf")), sums)
    return per_seq[:, seq]


def token_shares(token_weights: torch.Tensor, ce: Optional[torch.Tensor], weighting: str,
                 weighting_temperature: float = 1.0) -> torch.Tensor:
    """[N, M] per-token teacher shares: each column sums to 1, or is all 0 where every weight is 0.

    token_weights [N, M] >= 0; ce [N, M], needed by CE_WEIGHTINGS: the cross-entropy each teacher
    is ranked by at each token, i.e. `gold_cross_entropy` for min_ce_token and soft_ce, and the
    token's `sequence_cross_entropy` for min_ce_sequence.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")
    w = token_weights
    if weighting in CE_WEIGHTINGS:
        if ce is None:
            raise ValueError(f"weighting {weighting!r} needs the teachers' cross-entropy")
        served = w > 0
        if weighting in ("min_ce_sequence", "min_ce_token"):
            # -CE so that the winner is a max; teachers with w == 0 never win.
            score = torch.where(served, -ce, torch.full_like(ce, float("-inf")))
            best = score.amax(0, keepdim=True)
            # `score == best` also keeps the all -inf case (every served teacher has
            # CE = inf): then they tie and split by w.
            w = torch.where(served & (score == best), w, torch.zeros_like(w))
        else:
            logits = torch.where(served, -ce / weighting_temperature
                                 + torch.where(served, w, torch.ones_like(w)).log(),
                                 torch.full_like(ce, float("-inf")))
            top = logits.amax(0, keepdim=True)
            finite = torch.isfinite(top)
            # Subtract the max for stability; where it is -inf (no teacher with finite
            # CE) fall back to the weights themselves, the soft_ce -> min_ce_token tie rule.
            soft = torch.exp(logits - torch.where(finite, top, torch.zeros_like(top)))
            w = torch.where(finite, soft, w)
    total = w.sum(0, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(w))
