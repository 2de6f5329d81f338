"""Divergences between a sparse teacher and the student, on the teacher's k + 1 bins.

A cached teacher row gives k token probabilities and one residual mass for the
other V - k tokens, without saying how that mass is spread. Every divergence
here is therefore computed on the coarse-grained pair of distributions over
k + 1 bins:

    bin j < k : token ids[j]         P_j = teacher prob,  Q_j = student prob of ids[j]
    bin k     : every other token     P_k = teacher residual, Q_k = student mass outside ids

Q_k is exact (the student's logits are complete), so nothing pretends the top-k
sums to one. For every f-divergence (KL both ways, JSD, skew KL, TVD) the binned
value is a lower bound of the full-vocabulary value, equal to it when the
teacher's tail is shaped like the student's; with k == V it is the exact value.

Each divergence returns its value and its gradient with respect to log Q, which
the chunked loss turns into logit gradients (see chunked.py). Working with
d/dlogQ keeps the residual bin's gradient finite when Q_k is tiny.

Temperature (`teacher_log_bins`): the teacher's top-k probabilities are tempered
as p^(1/T); the residual bin is tempered as if its mass R were spread uniformly
over the V - k tokens it covers, i.e. (V-k) * (R/(V-k))^(1/T); then the k + 1
bins are renormalised. With T == 1 the bins are the cached values unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# (log P, log Q, beta, skew_alpha) -> (D [...], dD/dlogQ [..., K])
DivergenceFn = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]


def teacher_log_bins(logprobs: torch.Tensor, log_residual: torch.Tensor, vocab_size: int,
                     temperature: float) -> torch.Tensor:
    """Tempered teacher distribution over its k + 1 bins, as log-probabilities.

    logprobs [..., k] (temperature 1, top-k), log_residual [...] (may be -inf),
    vocab_size V >= k. Returns [..., k + 1]: top-k bins then the residual bin;
    the residual bin is -inf when k == V or the residual is zero.
    """
    k = logprobs.shape[-1]
    if k > vocab_size:
        raise ValueError(f"teacher top-k ({k}) is larger than the student vocabulary ({vocab_size})")
    res = log_residual.unsqueeze(-1)
    if k == vocab_size:
        # No token is left outside the top-k, whatever the cache stored.
        res = torch.full_like(res, float("-inf"))
    elif temperature != 1.0:
        # Uniform tail over V - k tokens: each has R/(V-k); tempered and summed back:
        # (V-k) * (R/(V-k))^(1/T) = R^(1/T) * (V-k)^(1 - 1/T).
        res = res / temperature + (1.0 - 1.0 / temperature) * math.log(vocab_size - k)
    bins = torch.cat([logprobs / temperature, res], dim=-1)
    return bins - torch.logsumexp(bins, dim=-1, keepdim=True)


def _plogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) elementwise with 0 * log 0 = 0 (and +inf where p > 0 = q)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q)."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def forward_kl(logp, logq, beta, skew_alpha):
    """KL(P || Q) = sum_b P_b (log P_b - log Q_b); d/dlogQ_b = -P_b."""
    return _plogratio(logp, logq).sum(-1), -logp.exp()


def reverse_kl(logp, logq, beta, skew_alpha):
    """KL(Q || P) = sum_b Q_b (log Q_b - log P_b); d/dlogQ_b = Q_b (log Q_b - log P_b + 1).

    Infinite where the teacher gives a bin zero mass that the student does not
    (e.g. a residual stored as exactly 0 with k < V).
    """
    term = _plogratio(logq, logp)
    grad = torch.where(logq.exp() > 0, term + logq.exp(), torch.zeros_like(term))
    return term.sum(-1), grad


def jsd(logp, logq, beta, skew_alpha):
    """Generalised JSD: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    The convention of GKD (trl) and Liger. JSD / beta -> KL(P || Q) as beta -> 0 and
    JSD / (1 - beta) -> KL(Q || P) as beta -> 1. d/dlogQ_b = (1 - beta) Q_b (log Q_b - log M_b).
    """
    logm = _log_mix(logp, logq, beta)
    q_term = _plogratio(logq, logm)
    value = beta * _plogratio(logp, logm).sum(-1) + (1 - beta) * q_term.sum(-1)
    return value, (1 - beta) * q_term


def skew_kl(logp, logq, beta, skew_alpha):
    """Skew KL of DistiLLM: KL(P || a P + (1 - a) Q), a = skew_alpha; -> KL(P || Q) as a -> 0.

    Finite even where Q_b = 0. d/dlogQ_b = -(1 - a) P_b Q_b / M_b.
    """
    logm = _log_mix(logp, logq, skew_alpha)
    p = logp.exp()
    grad = torch.where(p > 0, -(1 - skew_alpha) * p * (logq - logm).exp(), torch.zeros_like(p))
    return _plogratio(logp, logm).sum(-1), grad


def tvd(logp, logq, beta, skew_alpha):
    """Total variation 0.5 * sum_b |P_b - Q_b|; d/dlogQ_b = 0.5 Q_b sign(Q_b - P_b) (0 at a tie)."""
    p, q = logp.exp(), logq.exp()
    return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)


DIVERGENCES: dict[str, DivergenceFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
}
