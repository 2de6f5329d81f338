"""Properties of distill.loss that hold without a reference: zeros, limits, ground truths, weighting rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import bin_divergence, random_case, sequence_ce, sparse_signal

from distill.config import LossConfig
from distill.loss import (DIVERGENCES, TeacherSignal, distill_loss, example_weights, gold_cross_entropy,
                          sequence_cross_entropy, teacher_log_bins, token_shares)

ALL = sorted(DIVERGENCES)


def _loss(case, cfg, token_weights=None, signal=None):
    n, m = case["ids"].shape[:2]
    tw = torch.ones(n, m, dtype=case["hidden"].dtype) if token_weights is None else token_weights
    sig = signal or TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    return distill_loss(case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw, cfg)


def _self_teacher(case, k):
    """The student's own distribution as a sparse teacher [1, M, k]."""
    logits = case["hidden"] @ case["weight"].t() + case["bias"]
    return TeacherSignal(*sparse_signal(logits.unsqueeze(0), k))


@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("k,temperature", [(8, 1.0), (97, 1.0), (97, 2.5), (97, 0.5)])
def test_identical_teacher_and_student_give_zero(divergence, k, temperature):
    case = random_case(seed=1, pad=())
    case["hidden"].requires_grad_(True)
    cfg = LossConfig(divergence=divergence, temperature=temperature, chunk_size=6)
    out = _loss(case, cfg, torch.ones(1, 23, dtype=torch.float64), _self_teacher(case, k))
    out.loss_sum.backward()
    assert abs(out.loss_sum.item()) < 1e-10
    if divergence != "tvd":  # |P - Q| has no gradient at 0; rounding picks a sign
        assert case["hidden"].grad.abs().max().item() < 1e-8
    # ...and a different teacher is not at zero, so the check above can fail.
    other = _loss(case, cfg, torch.ones(3, 23, dtype=torch.float64))
    assert other.loss_sum.item() > 1e-2


def _full_divergence(name, p, q, beta, alpha):
    return bin_divergence(name, p, q, beta, alpha)  # over the whole vocabulary: every token its own bin


@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_v_is_the_exact_full_vocabulary_divergence(divergence, temperature):
    case = random_case(k=97, vocab=97, seed=6, pad=())
    cfg = LossConfig(divergence=divergence, temperature=temperature, beta=0.3, skew_alpha=0.2, chunk_size=5)
    out = _loss(case, cfg)
    student = case["hidden"] @ case["weight"].t() + case["bias"]
    q = torch.softmax(student / temperature, -1)
    p = torch.softmax(case["teacher_logits"] / temperature, -1)
    truth = _full_divergence(divergence, p, q.unsqueeze(0), 0.3, 0.2).sum(1) * temperature ** 2
    torch.testing.assert_close(out.teacher_div_sums, truth, rtol=1e-9, atol=1e-12)
    if divergence in ("forward_kl", "reverse_kl"):
        tl, sl = F.log_softmax(case["teacher_logits"] / temperature, -1), F.log_softmax(student / temperature, -1)
        kl = [F.kl_div(sl, t, log_target=True, reduction="sum") if divergence == "forward_kl"
              else F.kl_div(t, sl, log_target=True, reduction="sum") for t in tl]
        torch.testing.assert_close(out.teacher_div_sums, torch.stack(kl) * temperature ** 2)


@pytest.mark.parametrize("divergence", ALL)
def test_binned_divergence_is_a_lower_bound_of_the_full_one(divergence):
    case = random_case(k=6, vocab=97, seed=9, pad=())
    out = _loss(case, LossConfig(divergence=divergence, chunk_size=7))
    q = torch.softmax(case["hidden"] @ case["weight"].t() + case["bias"], -1)
    full = _full_divergence(divergence, torch.softmax(case["teacher_logits"], -1), q.unsqueeze(0), 0.5, 0.1).sum(1)
    assert (out.teacher_div_sums < full).all() and (out.teacher_div_sums > 0.2 * full).all()


def test_residual_bin_tempering_is_exact_for_a_uniform_tail():
    g = torch.Generator().manual_seed(0)
    vocab, k = 50, 5
    logits = torch.full((4, vocab), -1.0, dtype=torch.float64)
    logits[:, :k] = torch.randn(4, k, generator=g, dtype=torch.float64).abs() * 2 + 0.5
    ids, lp, res = sparse_signal(logits, k)
    for temperature in (0.5, 1.0, 3.0):
        full = torch.softmax(logits / temperature, -1)
        binned = torch.cat([full.gather(1, ids), (1 - full.gather(1, ids).sum(1, keepdim=True))], 1)
        torch.testing.assert_close(teacher_log_bins(lp, res, vocab, temperature).exp(), binned)


def test_jsd_beta_limits_are_the_two_kls():
    case = random_case(seed=12)
    fwd = _loss(case, LossConfig(divergence="forward_kl")).teacher_div_sums
    rev = _loss(case, LossConfig(divergence="reverse_kl")).teacher_div_sums
    for eps in (1e-3, 1e-5):
        small = _loss(case, LossConfig(divergence="jsd", beta=eps)).teacher_div_sums / eps
        large = _loss(case, LossConfig(divergence="jsd", beta=1 - eps)).teacher_div_sums / eps
        torch.testing.assert_close(small, fwd, rtol=200 * eps, atol=0)
        torch.testing.assert_close(large, rev, rtol=200 * eps, atol=0)
    mid = _loss(case, LossConfig(divergence="jsd", beta=0.5)).teacher_div_sums
    assert (mid < 0.5 * torch.minimum(fwd, rev)).all()


def test_skew_kl_tends_to_forward_kl():
    case = random_case(seed=13)
    fwd = _loss(case, LossConfig(divergence="forward_kl")).teacher_div_sums
    torch.testing.assert_close(_loss(case, LossConfig(divergence="skew_kl", skew_alpha=1e-7)).teacher_div_sums,
                               fwd, rtol=1e-5, atol=0)
    assert (_loss(case, LossConfig(divergence="skew_kl", skew_alpha=0.5)).teacher_div_sums < 0.8 * fwd).all()


@pytest.mark.parametrize("divergence", ALL)
def test_tiny_student_residual_stays_exact_in_fp32(divergence):
    # The student puts ~1e-48 outside the teacher's top-k: zero in fp32 linear space, but the
    # masked log-sum-exp keeps the residual bin (and the forward KL's p_R log(p_R / Q_R)) exact.
    vocab, k = 50, 3
    logits = torch.full((4, vocab), -60.0, dtype=torch.float64)
    logits[:, :k] = torch.tensor([60.0, 59.0, 58.5], dtype=torch.float64)
    ids = torch.arange(k).repeat(1, 4, 1)
    lp = torch.log(torch.tensor([0.6, 0.3, 0.09], dtype=torch.float64)).repeat(1, 4, 1)
    res = torch.full((1, 4), math.log(0.01), dtype=torch.float64)
    targets = torch.tensor([0, 1, 7, 2])
    cfg = LossConfig(divergence=divergence, chunk_size=3)
    results = []
    for dtype in (torch.float32, torch.float64):
        hidden = logits.to(dtype).requires_grad_(True)  # head = identity, so logits == hidden
        weight = torch.eye(vocab, dtype=dtype)
        sig = TeacherSignal(ids, lp.to(dtype), res.to(dtype))
        out = distill_loss(hidden, weight, None, sig, targets, torch.ones(1, 4, dtype=dtype), cfg)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach().double(), hidden.grad.double()))
    (v32, g32), (v64, g64) = results
    assert math.isfinite(v32.item()) and torch.isfinite(g32).all()
    # fp32 logits of size 60 carry ~4e-6 absolute error in every log-probability.
    torch.testing.assert_close(v32, v64, rtol=2e-4, atol=0)
    torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-4 * g64.abs().max().item())
    if divergence == "forward_kl":  # the residual term dominates: 0.01 * log(0.01 / Q_R), Q_R ~ 47 e^-118.5
        q_r = math.exp(torch.logsumexp(logits[0, k:], 0).item() - torch.logsumexp(logits[0], 0).item())
        assert v64.item() > 4 * 0.01 * math.log(0.01 / q_r) > 4.0


# ---------------------------------------------------------------- weighting


def test_example_weights_fixed_and_route():
    w = example_weights([1.0, 2.0, 0.5], [["math"], ["code", "math"], []], ["math", "code", None, "poetry"], "route")
    expected = torch.tensor([[1.0, 0, 1, 0], [2, 2, 2, 0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(w, expected)
    fixed = example_weights([1.0, 2.0, 0.5], [["math"], ["code"], []], ["math", "code", None, "poetry"], "fixed")
    torch.testing.assert_close(fixed, torch.tensor([[1.0] * 4, [2.0] * 4, [0.5] * 4]))
    no_generalist = example_weights([1.0, 1.0], [["math"], ["code"]], ["poetry"], "route")
    assert no_generalist.sum().item() == 0.0  # nobody serves it: CE only
    with pytest.raises(ValueError):
        example_weights([1.0], [[]], ["x"], "loudest")
    with pytest.raises(ValueError):
        example_weights([-1.0], [[]], ["x"], "fixed")


def test_gold_cross_entropy_inside_and_outside_the_top_k():
    ids = torch.tensor([[[3, 1]], [[4, 0]]])  # N=2, M=1, k=2, V=10
    lp = torch.log(torch.tensor([[[0.5, 0.3]], [[0.6, 0.1]]], dtype=torch.float64))
    res = torch.log(torch.tensor([[0.2], [0.3]], dtype=torch.float64))
    ce = gold_cross_entropy(ids, lp, res, torch.tensor([1]), vocab_size=10)
    torch.testing.assert_close(ce, torch.tensor([[-math.log(0.3)], [-math.log(0.3 / 8)]], dtype=torch.float64))
    full = gold_cross_entropy(ids, lp, res, torch.tensor([1]), vocab_size=2)  # k == V: no tail at all
    assert full[0, 0].item() == pytest.approx(-math.log(0.3)) and full[1, 0].item() == math.inf


def test_min_ce_token_winner_takes_the_token_and_ties_split_by_weight():
    ce = torch.tensor([[1.0, 1.0, 0.5, math.inf], [1.0, 1.0, 0.7, math.inf], [0.9, 3.0, 0.1, math.inf]])
    w = torch.tensor([[1.0, 1.0, 0.0, 2.0], [3.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    got = token_shares(w, ce, "min_ce_token")
    expected = torch.tensor([[0.0, 0.25, 0.0, 2 / 3], [0.0, 0.75, 0.0, 1 / 3], [1.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_soft_ce_values_and_limits():
    ce = torch.tensor([[1.0, 0.2], [2.0, 0.3], [0.5, 9.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    got = token_shares(w, ce, "soft_ce", 0.5)
    col0 = torch.tensor([math.exp(-2.0), 2 * math.exp(-4.0), math.exp(-1.0)], dtype=torch.float64)
    col1 = torch.tensor([math.exp(-0.4), math.exp(-0.6), 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, torch.stack([col0 / col0.sum(), col1 / col1.sum()], 1))
    torch.testing.assert_close(token_shares(w, ce, "soft_ce", 1e-4), token_shares(w, ce, "min_ce_token"))
    torch.testing.assert_close(token_shares(w, ce, "soft_ce", 1e8), token_shares(w, ce, "fixed"), rtol=1e-6,
                               atol=1e-7)
    zero = token_shares(torch.zeros(3, 2, dtype=torch.float64), ce, "soft_ce", 1.0)
    assert zero.abs().sum().item() == 0.0


def test_every_served_teacher_missing_the_gold_token_splits_by_weight():
    ce = torch.full((2, 1), math.inf)
    w = torch.tensor([[1.0], [3.0]])
    for weighting in ("min_ce_token", "min_ce_sequence", "soft_ce"):
        torch.testing.assert_close(token_shares(w, ce, weighting), torch.tensor([[0.25], [0.75]]))


# ---------------------------------------------------------------- MinCE: per sequence (FuseLLM) and per token


def test_sequence_cross_entropy_matches_naive_sums():
    g = torch.Generator().manual_seed(3)
    ce = torch.rand(3, 12, generator=g, dtype=torch.float64) * 4
    seq = torch.tensor([7, 7, 3, 3, 9, 9, 9, 3, 7, 0, 0, 9])  # any ids, not contiguous
    valid = torch.ones(12, dtype=torch.bool)
    valid[[1, 10]] = False
    ce[1, 4] = math.inf  # teacher 1 misses a gold token of sequence 9 with a zero residual
    ce[2, 10] = math.inf  # ... and teacher 2 at a padding position of sequence 0, which must not count
    got = sequence_cross_entropy(ce, seq, valid)
    torch.testing.assert_close(got, sequence_ce(ce, seq, valid), rtol=1e-12, atol=0)
    assert got[1, 5].item() == math.inf and torch.isfinite(got[[0, 2]]).all()
    # Each token carries its whole sequence's sum: sequence 3 is tokens 2, 3, 7.
    assert got[0, 2].item() == got[0, 7].item() == pytest.approx(float(ce[0, [2, 3, 7]].sum()))


# Three teachers, two samples (tokens 0-2 and 3-4); teacher 2 has the lowest CE everywhere but weight 0.
_CE = torch.tensor([[0.1, 0.1, 5.0, 1.0, 1.0],
                    [1.0, 1.0, 1.0, 0.5, 1.5],
                    [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
_W = torch.tensor([[1.0] * 5, [3.0] * 5, [0.0] * 5], dtype=torch.float64)
_SEQ = torch.tensor([0, 0, 0, 1, 1])


def test_min_ce_sequence_ties_split_by_weight_and_weight_zero_never_wins():
    seq_ce = sequence_cross_entropy(_CE, _SEQ, torch.ones(5, dtype=torch.bool))
    got = token_shares(_W, seq_ce, "min_ce_sequence")
    # Sample 0: sums 5.2, 3.0, (0.0 at weight 0) -> teacher 1 takes all of it. Sample 1: 2.0 vs 2.0 -> 1 : 3.
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.25, 0.25], [1.0, 1.0, 1.0, 0.75, 0.75], [0.0] * 5],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    # Per token the same CEs give another answer: teacher 0 wins tokens 0, 1, 4 and teacher 1 tokens 2, 3.
    token = token_shares(_W, _CE, "min_ce_token")
    expected_token = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0], [0.0] * 5],
                                  dtype=torch.float64)
    torch.testing.assert_close(token, expected_token)


def _full_signal(ce: torch.Tensor, targets: torch.Tensor, vocab: int) -> TeacherSignal:
    """k = V teachers whose gold-token CE is exactly `ce` [N, M]; the rest of the mass is uniform."""
    n, m = ce.shape
    p_gold = torch.exp(-ce)
    probs = ((1 - p_gold) / (vocab - 1)).unsqueeze(-1).expand(n, m, vocab).clone()
    probs.scatter_(2, targets.view(1, m, 1).expand(n, m, 1), p_gold.unsqueeze(-1))
    ids = torch.arange(vocab).expand(n, m, vocab).contiguous()
    return TeacherSignal(ids, probs.log(), torch.full((n, m), -math.inf, dtype=ce.dtype))


def test_min_ce_sequence_and_token_differ_in_the_loss():
    """Through distill_loss: each weighting equals the fixed loss with its winners' one-hot weights."""
    vocab = 11
    case = random_case(m=5, vocab=vocab, n=3, k=vocab, seed=17, pad=())
    targets = case["targets"]
    sig = _full_signal(_CE, targets, vocab)
    args = (case["hidden"], case["weight"], case["bias"], sig, targets)
    cfg = dict(divergence="forward_kl", ce_weight=0.1, chunk_size=2)
    seq_out = distill_loss(*args, _W, LossConfig(weighting="min_ce_sequence", **cfg), sequence_index=_SEQ)
    tok_out = distill_loss(*args, _W, LossConfig(weighting="min_ce_token", **cfg), sequence_index=_SEQ)
    torch.testing.assert_close(seq_out.teacher_weight_sums, torch.tensor([0.5, 4.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(tok_out.teacher_weight_sums, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    one_hot = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 3, 3], [0] * 5], dtype=torch.float64)
    fixed = distill_loss(*args, one_hot, LossConfig(weighting="fixed", **cfg))
    torch.testing.assert_close(seq_out.loss_sum, fixed.loss_sum)
    assert abs(seq_out.loss_sum.item() - tok_out.loss_sum.item()) > 1e-3


def test_min_ce_sequence_needs_the_sequence_index():
    case = random_case(seed=18)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    tw = torch.ones(3, 23, dtype=torch.float64)
    args = (case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw)
    with pytest.raises(ValueError, match="sequence_index"):
        distill_loss(*args, LossConfig(weighting="min_ce_sequence"))
    with pytest.raises(ValueError, match="sequence_index"):
        distill_loss(*args, LossConfig(weighting="min_ce_sequence"), sequence_index=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown weighting 'min_ce'"):
        distill_loss(*args, LossConfig(weighting="min_ce"))


# ---------------------------------------------------------------- plumbing


def test_no_grad_frozen_head_and_single_backward():
    case = random_case(seed=14)
    cfg = LossConfig(divergence="jsd", chunk_size=4, ce_weight=0.2)
    with torch.no_grad():
        plain = _loss(case, cfg)
    assert not plain.loss_sum.requires_grad
    case["hidden"].requires_grad_(True)
    out = _loss(case, cfg)  # head and bias frozen (a LoRA student): only hidden gets a gradient
    torch.testing.assert_close(out.loss_sum.detach(), plain.loss_sum)
    out.loss_sum.backward(retain_graph=True)
    assert case["hidden"].grad is not None and case["weight"].grad is None
    with pytest.raises(RuntimeError, match="one backward"):
        out.loss_sum.backward()


def test_scaled_backward_and_bfloat16_run():
    case = random_case(seed=15, dtype=torch.float32, vocab=300, m=64)
    case["hidden"].requires_grad_(True)
    (2.5 * _loss(case, LossConfig(chunk_size=16)).loss_sum).backward()
    g32 = case["hidden"].grad.clone()
    case["hidden"].grad = None
    _loss(case, LossConfig(chunk_size=16)).loss_sum.backward()
    torch.testing.assert_close(g32, 2.5 * case["hidden"].grad)
    ref = _loss(case, LossConfig(chunk_size=16)).loss_sum.item()
    bf = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    bf["hidden"] = bf["hidden"].detach().requires_grad_(True)
    bf["weight"].requires_grad_(True)
    out = _loss(bf, LossConfig(chunk_size=16), torch.ones(3, 64, dtype=torch.bfloat16))
    out.loss_sum.backward()
    assert out.loss_sum.dtype == torch.float32 and bf["weight"].grad.dtype == torch.bfloat16
    assert out.loss_sum.item() == pytest.approx(ref, rel=0.05)


def test_bad_inputs_raise():
    case = random_case(seed=16)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    tw = torch.ones(3, 23, dtype=torch.float64)
    args = (case["hidden"], case["weight"], case["bias"])
    with pytest.raises(ValueError, match="token_weights"):
        distill_loss(*args, sig, case["targets"], -tw, LossConfig())
    with pytest.raises(ValueError, match="targets"):
        distill_loss(*args, sig, case["targets"][:5], tw, LossConfig())
    with pytest.raises(ValueError, match="ids"):
        bad = TeacherSignal(case["ids"] + 1000, case["logprobs"], case["log_residual"])
        distill_loss(*args, bad, case["targets"], tw, LossConfig())
    with pytest.raises(ValueError, match="divergence"):
        distill_loss(*args, sig, case["targets"], tw, LossConfig(divergence="hellinger"))
