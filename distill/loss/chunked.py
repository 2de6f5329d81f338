"""The LM head and the multi-teacher loss, fused and computed `chunk_size` tokens at a time.

Student logits exist only for one chunk: one [chunk, V] buffer that holds the
logits and then, row block by row block, their gradient, plus two small fp32
temporaries; never [M, V]. The logits' gradient has a closed form
(below), so each chunk's gradient with respect to hidden, head weight and bias
is computed in the forward pass, right after its loss, and kept; backward only
scales the kept gradients by the incoming one. That is the same three matmuls
as the dense path (logits, grad hidden, grad weight) and no recompute.

The closed form. Per teacher, the divergence D depends on the student only
through the k + 1 bin log-masses log Q (divergences.py), with H = dD/dlog Q:

    log Q_j = s[id_j] - lse(s)              (top-k bins)
    log Q_R = lse(s outside ids) - lse(s)    (residual bin)

so, for tempered logits s = u / T and q = softmax(s), where u = f(z) are the model's own
logits (distill/logits.py: f(z) = c tanh(a z / c) with a softcap c, a z without one),

    dD/ds_v = H_j                          if v == id_j
            + H_R * exp(s_v - lse_rest)    if v is outside the top-k
            - q_v * sum_b H_b              for every v

exp(s_v - lse_rest) <= 1 is computed directly (never as q_v / Q_R), so a student
residual far below fp32's range still gives exact gradients. The CE term is taken on u
(temperature 1). Then dloss/dz = dloss/du * f'(z), with f'(z) = a (1 - (u / c)^2) read off u
(tanh' = 1 - tanh^2), or the constant a without a softcap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distill.logits import IDENTITY, LogitTransform
from distill.loss.divergences import DIVERGENCES

# Elementwise work on a chunk's logits runs in row blocks of at most this many
# elements (32 MiB in fp32) so its fp32 temporaries stay small whatever chunk_size is.
BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class ChunkSpec:
    """The scalar settings one call needs (from LossConfig)."""

    divergence: str
    temperature: float
    beta: float
    skew_alpha: float
    ce_weight: float
    chunk_size: int
    transform: LogitTransform = IDENTITY  # head output -> the model's logits, before the temperature
    matmul_dtype: Optional[torch.dtype] = None  # the head matmuls' operand dtype; None: the weight's own


def _logsumexp(x: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp of x [C, V] without allocating: scratch [C, V] receives exp(x - rowmax).

    Returns (lse [C, 1], total [C, 1]) with total = sum(scratch); rows that are all
    -inf give lse = -inf, total = 0 and a zero scratch row.
    """
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    torch.sub(x, m, out=scratch).exp_()
    total = scratch.sum(-1, keepdim=True)
    return total.log() + m, total


def _rows_loss(z: torch.Tensor, ids: torch.Tensor, logp_bins: torch.Tensor, targets: torch.Tensor,
               coef: torch.Tensor, valid: torch.Tensor, spec: ChunkSpec, want_grad: bool):
    """Loss of b token rows given their head outputs z [b, V] (fp32/fp64, overwritten).

    ids [N, b, k] int64; logp_bins [N, b, k + 1] tempered teacher bins; targets [b]
    (a valid id at padding); coef [N, b] = (1 - ce_weight) * T^2 * share, 0 at padding;
    valid [b] 1.0 / 0.0. Returns loss (0-dim sum over the rows), div [N] (T^2 * D summed
    over valid rows, unweighted) and ce (0-dim sum over valid rows); with want_grad,
    z holds dloss/dz on return. Allocates two more [b, V] buffers.
    """
    T, c, transform = spec.temperature, spec.ce_weight, spec.transform
    divergence = DIVERGENCES[spec.divergence]
    transform.apply_(z)  # z now holds the model's logits u; everything below is in terms of u
    scratch = torch.empty_like(z)
    lse_z, total_z = _logsumexp(z, scratch)
    ce_tok = (lse_z.squeeze(-1) - z.gather(1, targets[:, None]).squeeze(-1)) * valid
    grad = None
    if want_grad:
        if c > 0:
            # dCE/dz = softmax(z) - onehot(target); scratch holds exp(z - max) already, so
            # scaling it in place makes it the gradient buffer (one allocation saved).
            grad = scratch.mul_((c * valid)[:, None] / total_z)
            grad.scatter_add_(1, targets[:, None], -(c * valid)[:, None])
            scratch = torch.empty_like(z)
        else:
            grad = torch.zeros_like(z)
    s = z if T == 1.0 else z.div_(T)  # in place: z itself is no longer needed
    lse_s = lse_z if T == 1.0 else _logsumexp(s, scratch)[0]
    loss = (c * ce_tok).sum()
    div = []
    base = torch.zeros_like(lse_s)  # sum over teachers of coef * sum_b H_b, per token
    for i in range(ids.shape[0]):
        idx = ids[i]
        top = s.gather(1, idx)
        s.scatter_(1, idx, float("-inf"))  # mask this teacher's top-k to get the residual's lse
        lse_rest, total_rest = _logsumexp(s, scratch)
        s.scatter_(1, idx, top)  # exact restore
        logq = torch.cat([top - lse_s, lse_rest - lse_s], dim=-1)
        d, dd_dlogq = divergence(logp_bins[i], logq, spec.beta, spec.skew_alpha)
        used = coef[i] > 0
        # A zero-share teacher must not leak inf/nan (e.g. reverse KL on a zero residual).
        loss = loss + torch.where(used, coef[i] * d, torch.zeros_like(d)).sum()
        div.append(torch.where(valid > 0, d, torch.zeros_like(d)).sum() * T * T)
        if grad is not None:
            # dloss/dz = coef * dD/ds / T (s = z / T).
            hw = torch.where(used[:, None], (coef[i] / T)[:, None] * dd_dlogq, torch.zeros_like(dd_dlogq))
            k = idx.shape[1]
            rest_scale = torch.where(total_rest > 0, hw[:, k:] / total_rest, torch.zeros_like(total_rest))
            grad.addcmul_(scratch, rest_scale)  # scratch = exp(s - max_rest), zero on the top-k
            grad.scatter_add_(1, idx, hw[:, :k])
            base += hw.sum(-1, keepdim=True)
    if grad is not None:
        # du/dz, before s (= u / T) is overwritten; scratch is free again after the teacher loop.
        slope = (transform.scale if transform.softcap is None
                 else transform.softcap_grad_(torch.mul(s, T, out=scratch)))
        # z <- (grad - q * base) * du/dz, with q = softmax(s) computed in z's own memory.
        s.sub_(lse_s).exp_().mul_(-base).add_(grad)
        if not transform.is_identity:
            s.mul_(slope)
    return loss, torch.stack(div), ce_tok.sum()


def chunk_loss(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
               logp_bins: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, valid: torch.Tensor,
               spec: ChunkSpec, want_grad: bool):
    """Loss of one chunk of C tokens, and optionally its gradient with respect to the head's output.

    h [C, H] (in weight's dtype); weight [V, H]; bias [V] or None; the rest as in `_rows_loss`
    with C rows. Returns loss, div [N], ce and the gradient [C, V] with respect to z = h W^T + b
    (before spec.transform) in weight's dtype (or None). The gradient is written over z, row
    block by row block, so a chunk holds one [C, V] buffer plus two [rows, V] fp32 temporaries
    (rows * V <= BLOCK_ELEMENTS).
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    rows = max(1, BLOCK_ELEMENTS // z.shape[1])
    loss = z.new_zeros((), dtype=compute)
    div = z.new_zeros(ids.shape[0], dtype=compute)
    ce = z.new_zeros((), dtype=compute)
    for start in range(0, z.shape[0], rows):
        r = slice(start, start + rows)
        block = z[r]
        # A view for fp32/fp64 heads (worked on in place); a low-precision head's logits are
        # upcast per block, so its chunk buffer stays in bf16/fp16 and receives the gradient.
        work = block if block.dtype == compute else block.to(compute)
        l_b, d_b, ce_b = _rows_loss(work, ids[:, r], logp_bins[:, r], targets[r], coef[:, r], valid[r], spec,
                                    want_grad)
        loss += l_b
        div += d_b
        ce += ce_b
        if want_grad and work is not block:
            block.copy_(work)
    return loss, div, ce, (z if want_grad else None)


class ChunkedDistill(torch.autograd.Function):
    """loss, div [N], ce = f(hidden, weight, bias; teacher tensors); see `chunk_loss`.

    Gradients for hidden / weight / bias are computed in forward (only those that
    are needed) and handed out in backward, which may therefore run only once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logp_bins, targets, coef, valid, spec: ChunkSpec):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        want_grad = need_h or need_w or need_b
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Accumulate the head's gradient in at least fp32 across chunks, as one dense matmul would.
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_b else None
        loss = hidden.new_zeros((), dtype=compute)
        div = hidden.new_zeros(ids.shape[0], dtype=compute)
        ce = hidden.new_zeros((), dtype=compute)
        # Under autocast the matmuls take its dtype, like a dense head (one [V, H] copy per call);
        # the gradients above still accumulate in the weight's own precision.
        mm = spec.matmul_dtype or weight.dtype
        w, b = weight.to(mm), None if bias is None else bias.to(mm)
        for start in range(0, hidden.shape[0], spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            h = hidden[rows].to(mm)
            l_c, d_c, ce_c, g = chunk_loss(h, w, b, ids[:, rows], logp_bins[:, rows], targets[rows],
                                           coef[:, rows], valid[rows], spec, want_grad)
            loss += l_c
            div += d_c
            ce += ce_c
            if g is None:
                continue
            if need_h:
                grad_h[rows] = g @ w
            if need_w:
                if grad_w.dtype == w.dtype:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).to(compute)
            if need_b:
                grad_b += g.sum(0, dtype=compute)
            del g
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(div, ce)
        return loss, div, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_div, grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the chunked distillation loss supports one backward pass per forward")
        grads, ctx.grads = ctx.grads, None
        # In place: the kept gradients are ours and used once; saves a [V, H] copy.
        out = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return out + (None,) * 6
