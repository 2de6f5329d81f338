"""Dense reference for distill.loss, for tests and bench/loss_bench.py only.

Written independently of the library, straight from docs/loss.md: full [M, V]
student logits, probabilities (not log-space tricks), the teacher's residual bin
built from a [M, V] membership mask, and plain autograd for the gradients.
Deliberately naive: its memory is what "dense" means in the benchmark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def _plogpq(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_b p_b log(p_b / q_b), 0 where p_b == 0; double where so autograd stays finite."""
    pos = p > 0
    ratio = torch.where(pos, p, torch.ones_like(p)) / torch.where(pos, q, torch.ones_like(q))
    return torch.where(pos, p * torch.log(ratio), torch.zeros_like(p)).sum(-1)


def bin_divergence(name: str, p: torch.Tensor, q: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """Divergence between probability vectors p, q [..., K] over the last dim."""
    if name == "forward_kl":
        return _plogpq(p, q)
    if name == "reverse_kl":
        return _plogpq(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _plogpq(p, m) + (1 - beta) * _plogpq(q, m)
    if name == "skew_kl":
        return _plogpq(p, alpha * p + (1 - alpha) * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(name)


def teacher_bins(logprobs: torch.Tensor, log_residual: torch.Tensor, vocab: int, temperature: float):
    """[..., k + 1] tempered teacher probabilities: top-k p^(1/T), residual spread uniformly then tempered."""
    k = logprobs.shape[-1]
    top = logprobs.exp() ** (1.0 / temperature)
    if k < vocab:
        per_token = log_residual.exp() / (vocab - k)
        tail = (vocab - k) * per_token ** (1.0 / temperature)
    else:
        tail = torch.zeros_like(log_residual)
    bins = torch.cat([top, tail.unsqueeze(-1)], dim=-1)
    return bins / bins.sum(-1, keepdim=True)


def shares(token_weights, ids, logprobs, log_residual, targets, vocab, weighting, tau):
    """[N, M] per-token teacher shares (see distill/loss/weighting.py's docstring)."""
    w = token_weights.clone()
    k = ids.shape[-1]
    if weighting in ("min_ce", "soft_ce"):
        hit = ids == targets.clamp_min(0)[None, :, None]
        ce_top = -(logprobs * hit).sum(-1)
        ce_tail = -(log_residual - math.log(vocab - k)) if k < vocab else torch.full_like(log_residual, math.inf)
        ce = torch.where(hit.any(-1), ce_top, ce_tail)
        if weighting == "min_ce":
            ce_served = ce.masked_fill(w <= 0, math.inf)
            winners = ce_served == ce_served.min(0, keepdim=True).values
            w = w * winners
        else:
            scores = (-ce / tau + w.log()).masked_fill(w <= 0, -math.inf)
            soft = torch.softmax(scores, dim=0)
            w = torch.where(torch.isnan(soft), w, soft)  # every served teacher at CE = inf: split by w
    total = w.sum(0, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w))


def dense_loss(hidden, weight, bias, ids, logprobs, log_residual, targets, token_weights, cfg):
    """Returns (loss_sum, n_tokens, teacher_div_sums [N], teacher_weight_sums [N], ce_sum)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return dense_loss_from_logits(logits, ids, logprobs, log_residual, targets, token_weights, cfg)


def dense_loss_from_logits(logits, ids, logprobs, log_residual, targets, token_weights, cfg):
    """dense_loss from the student's logits [M, V] themselves (e.g. a model's own `.logits`)."""
    vocab = logits.shape[-1]
    T = cfg.temperature
    valid = targets != IGNORE
    q = torch.softmax(logits / T, dim=-1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    with torch.no_grad():
        a = shares(token_weights, ids, logprobs, log_residual, targets, vocab, cfg.weighting,
                   cfg.weighting_temperature) * valid
        p_bins = teacher_bins(logprobs, log_residual, vocab, T)
    loss = cfg.ce_weight * ce.sum()
    divs = []
    for i in range(ids.shape[0]):
        member = torch.zeros_like(q, dtype=torch.bool).scatter(1, ids[i], True)
        q_bins = torch.cat([q.gather(1, ids[i]), (q * ~member).sum(-1, keepdim=True)], dim=-1)
        d = bin_divergence(cfg.divergence, p_bins[i], q_bins, cfg.beta, cfg.skew_alpha) * T * T
        loss = loss + (1 - cfg.ce_weight) * torch.where(a[i] > 0, a[i] * d, torch.zeros_like(d)).sum()
        divs.append(torch.where(valid, d, torch.zeros_like(d)).sum().detach())
    return loss, int(valid.sum()), torch.stack(divs), a.sum(1), ce.sum().detach()


# ---------------------------------------------------------------- test data


def sparse_signal(teacher_logits: torch.Tensor, k: int):
    """Top-k ids, log-probs and log residual of full teacher logits [N, M, V] (like the cache writes)."""
    logp = torch.log_softmax(teacher_logits, dim=-1)
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, top, rest


def random_case(m=23, h=16, vocab=97, n=3, k=8, dtype=torch.float64, seed=0, bias=True, pad=(3, 11)):
    """Student hidden/head/bias and N teachers correlated with the student, some gold tokens
    outside every top-k, padding at the positions in `pad`. Returns a dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=dtype)
    weight = torch.randn(vocab, h, generator=g, dtype=dtype) / math.sqrt(h) * 3
    b = torch.randn(vocab, generator=g, dtype=dtype) * 0.5 if bias else None
    student = hidden @ weight.t()
    teacher_logits = student.unsqueeze(0) + 2.0 * torch.randn(n, m, vocab, generator=g, dtype=dtype)
    ids, top, rest = sparse_signal(teacher_logits, k)
    targets = torch.randint(0, vocab, (m,), generator=g)
    targets[: m // 3] = ids[0, : m // 3, 0]  # some gold tokens are a teacher's top-1
    for p in pad:
        if p < m:
            targets[p] = IGNORE
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, logprobs=top, log_residual=rest,
                targets=targets, teacher_logits=teacher_logits)
