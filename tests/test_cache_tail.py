"""The tail of a sparse row: one residual floor for every codec, and rows fitted to a student's vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from distill.cache.codec import make_codec, sparse_from_logits
from distill.cache.tail import RESIDUAL_FLOOR, fit_vocab, student_codec
from distill.config import LossConfig
from distill.errors import DistillError
from distill.loss import TeacherSignal, distill_loss


def naive_fit(ids: list[int], lp: list[float], res: float, V: int) -> tuple[list[int], list[float], float]:
    """One row, straight from the rule in distill/cache/tail.py: ids the student lacks join the tail,
    freed slots take the largest ids the row lacks with equal shares of it."""
    k_out = min(len(ids), V)
    kept = [(i, math.exp(p)) for i, p in zip(ids, lp) if i < V]
    raw = math.exp(res) + sum(math.exp(p) for i, p in zip(ids, lp) if i >= V)
    tail = max(raw, math.exp(RESIDUAL_FLOOR)) if k_out < V else raw
    n = len(kept)
    if n == V:  # no token outside the row: the entries are all the student can predict
        total = sum(p for _, p in kept)
        return [i for i, _ in kept], [math.log(p / total) for _, p in kept], -math.inf
    out_ids = [i for i, _ in kept]
    out_lp = [math.log(p * (1 - tail) / (1 - raw)) for _, p in kept]  # kept entries hold 1 - raw already
    have = set(out_ids)
    free = [i for i in range(V - 1, -1, -1) if i not in have][:k_out - n]
    out_ids += free
    out_lp += [math.log(tail / (V - n))] * len(free)
    out_res = math.log(tail * (V - k_out) / (V - n)) if k_out < V else -math.inf
    return out_ids, out_lp, out_res


@pytest.mark.parametrize("cache_V,student_V,k", [(60, 50, 8), (60, 50, 60), (50, 58, 8), (50, 58, 50), (60, 4, 8)])
def test_fit_vocab_matches_the_rule_and_stays_proper(cache_V, student_V, k):
    g = torch.Generator().manual_seed(cache_V + student_V + k)
    logits = torch.randn(64, cache_V, generator=g) * 3
    logits[:8, student_V:] += 8  # rows whose top ids are mostly ids the student lacks
    ids, lp, res = sparse_from_logits(logits, k)
    got_ids, got_lp, got_res = fit_vocab(ids, lp, res, student_V)
    assert got_ids.shape == (64, min(k, student_V)) and int(got_ids.max()) < student_V
    assert all(len(set(r.tolist())) == len(r) for r in got_ids)
    total = torch.logsumexp(torch.cat([got_lp, got_res[:, None]], -1).double(), -1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
    for r in range(64):
        ref_ids, ref_lp, ref_res = naive_fit(ids[r].tolist(), lp[r].tolist(), float(res[r]), student_V)
        assert got_ids[r].tolist() == ref_ids
        assert torch.allclose(got_lp[r], torch.tensor(ref_lp), atol=1e-5)
        assert math.isclose(float(got_res[r]), ref_res, abs_tol=1e-5) or float(got_res[r]) == ref_res == -math.inf


def test_student_codec_refuses_a_student_without_a_row_for_every_token():
    codec = make_codec("fp16", 4, 60)
    assert student_codec(codec, 60, 50) is codec  # same vocabulary: the cache's own codec
    assert student_codec(codec, 50, 50).k == 4 and student_codec(codec, 70, 50).vocab_size == 70
    with pytest.raises(DistillError, match="49 rows, fewer than the tokenizer's 50 tokens .*have 60 rows"):
        student_codec(codec, 49, 50)


def _reverse_kl(ids, lp, res, z) -> float:
    """Reverse KL of the student logits z [1, V] against one decoded teacher row, through the library loss."""
    V = z.shape[1]
    signal = TeacherSignal(ids[None], lp[None], res[None])
    out = distill_loss(z, torch.eye(V), None, signal, torch.zeros(1, dtype=torch.long), torch.ones(1, 1),
                       LossConfig(divergence="reverse_kl"))
    return float(out.loss_sum)


def test_every_codec_decodes_one_residual_floor_so_reverse_kl_agrees():
    # A peaked row whose tail rounded to zero in capture (sparse_from_logits gives -inf then).
    V, k = 1000, 8
    ids = torch.tensor([[7, 3, 900, 15, 40, 2, 512, 99]])
    lp = torch.log_softmax(torch.tensor([[20.0, 10, 8, 6, 4, 2, 1, 0]]), -1)
    res = torch.tensor([float("-inf")])
    z = torch.zeros(1, V)
    z[0, 7] = 5.0  # the student: some mass on the top-1, most on the tail
    losses = {}
    for name in ("fp16", "ef6", "vk64"):
        codec = make_codec(name, k, V)
        d_ids, d_lp, d_res = codec.decode(codec.encode(ids, lp, res))
        assert abs(float(d_res[0]) - RESIDUAL_FLOOR) < 1e-4, (name, float(d_res[0]))
        losses[name] = _reverse_kl(d_ids[0:1], d_lp, d_res, z)
    assert 10 < losses["ef6"] < 20, losses
    assert max(losses.values()) - min(losses.values()) < 0.05, losses
