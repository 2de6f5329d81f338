"""distill.loss against the dense reference (tests/loss_reference.py): values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import IGNORE, dense_loss, random_case

from distill.config import LossConfig
from distill.logits import LogitTransform
from distill.loss import DIVERGENCES, WEIGHTINGS, TeacherSignal, distill_loss, example_weights

DOMAINS = [["math"], ["code"], []]  # the third teacher is a generalist
SAMPLE_DOMAINS = ["math", "code", None, "math"]


def _sample_of_token(case):
    """The sample (of 4, contiguous token spans) each token belongs to: [M]."""
    m = case["ids"].shape[1]
    return torch.arange(m) * len(SAMPLE_DOMAINS) // m


def _token_weights(case, weighting, teacher_weights=(1.0, 2.0, 0.5)):
    """Per-example weights (4 samples, contiguous token spans) expanded to tokens."""
    n = case["ids"].shape[0]
    per_example = example_weights(list(teacher_weights[:n]), DOMAINS[:n], SAMPLE_DOMAINS, weighting)
    return per_example[:, _sample_of_token(case)].to(case["hidden"].dtype)


def _run_both(case, cfg, token_weights, scale=1.0, softcap=None):
    """Chunked and dense results with gradients for hidden, weight and bias (logits: scale, then softcap)."""
    results = []
    for fn in ("chunked", "dense"):
        leaves = {k: case[k].clone().requires_grad_(True) for k in ("hidden", "weight")}
        leaves["bias"] = None if case["bias"] is None else case["bias"].clone().requires_grad_(True)
        if fn == "chunked":
            out = distill_loss(leaves["hidden"], leaves["weight"], leaves["bias"],
                               TeacherSignal(case["ids"], case["logprobs"], case["log_residual"]),
                               case["targets"], token_weights, cfg, sequence_index=_sample_of_token(case),
                               logit_transform=LogitTransform(scale=scale, softcap=softcap))
            vals = (out.loss_sum, out.n_tokens, out.teacher_div_sums, out.teacher_weight_sums, out.ce_sum)
        else:
            vals = dense_loss(leaves["hidden"], leaves["weight"], leaves["bias"], case["ids"], case["logprobs"],
                              case["log_residual"], case["targets"], token_weights, cfg, scale=scale,
                              softcap=softcap, sequence_index=_sample_of_token(case))
        vals[0].backward()
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
        results.append((vals, grads))
    return results


def _assert_match(case, cfg, token_weights, rtol=1e-5, grad_rtol=1e-4, **transform):
    (got, got_g), (ref, ref_g) = _run_both(case, cfg, token_weights, **transform)
    assert got[1] == ref[1]  # n_tokens
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol * 1e-2)
    assert set(got_g) == set(ref_g) and got_g
    for name in ref_g:
        scale = ref_g[name].abs().max().item()
        assert scale > 0, f"reference gradient of {name} is zero: the test would prove nothing"
        torch.testing.assert_close(got_g[name], ref_g[name], rtol=grad_rtol, atol=grad_rtol * scale)
    return got, got_g


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_every_divergence_and_weighting_matches_dense(divergence, weighting):
    case = random_case(seed=sorted(DIVERGENCES).index(divergence) * 10 + WEIGHTINGS.index(weighting))
    cfg = LossConfig(divergence=divergence, weighting=weighting, temperature=1.7, ce_weight=0.25,
                     beta=0.3, skew_alpha=0.2, weighting_temperature=0.7, chunk_size=5)  # 5 does not divide 23
    got, _ = _assert_match(case, cfg, _token_weights(case, weighting), rtol=1e-9, grad_rtol=1e-7)
    assert got[1] == 21 and got[0].item() > 0


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_fp32_matches_dense_within_tolerance(divergence):
    case = random_case(dtype=torch.float32, vocab=211, m=40, seed=3)
    cfg = LossConfig(divergence=divergence, weighting="soft_ce", temperature=2.0, ce_weight=0.1, chunk_size=16)
    _assert_match(case, cfg, _token_weights(case, "soft_ce"), rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("k", [1, 96, 97])  # V = 97: k == V has a -inf residual
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_top_k_extremes(k, divergence):
    case = random_case(k=k, vocab=97, seed=k)
    if k == 97:
        assert torch.isinf(case["log_residual"]).all()
    for weighting, temperature in (("fixed", 1.0), ("min_ce_token", 0.6)):
        cfg = LossConfig(divergence=divergence, weighting=weighting, temperature=temperature, chunk_size=4)
        got, grads = _assert_match(case, cfg, _token_weights(case, weighting), rtol=1e-9, grad_rtol=1e-7)
        assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_zero_weight_teacher_and_zero_weight_tokens(divergence):
    case = random_case(seed=11)
    tw = _token_weights(case, "fixed", teacher_weights=(1.0, 0.0, 2.0))
    tw[:, 5:9] = 0.0  # tokens no teacher serves: CE only
    cfg = LossConfig(divergence=divergence, weighting="fixed", ce_weight=0.4, chunk_size=6)
    got, _ = _assert_match(case, cfg, tw, rtol=1e-9, grad_rtol=1e-7)
    assert got[3][1].item() == 0.0  # teacher 1 never gets a share
    valid = case["targets"] != IGNORE
    distilled = int((valid & (tw.sum(0) > 0)).sum())
    torch.testing.assert_close(got[3].sum().item(), float(distilled))


def test_zero_weight_token_contributes_only_its_ce():
    case = random_case(seed=5, pad=())
    cfg = LossConfig(divergence="forward_kl", ce_weight=0.3, chunk_size=7)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    tw = torch.ones(3, 23, dtype=torch.float64)
    full = distill_loss(case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw, cfg)
    tw[:, 4] = 0
    cut = distill_loss(case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw, cfg)
    # Token 4 alone, with and without its teachers:
    one = {k: case[k][4:5] for k in ("hidden", "targets")}
    one_sig = TeacherSignal(case["ids"][:, 4:5], case["logprobs"][:, 4:5], case["log_residual"][:, 4:5])
    tok = distill_loss(one["hidden"], case["weight"], case["bias"], one_sig, one["targets"],
                       torch.ones(3, 1, dtype=torch.float64), cfg)
    expected = full.loss_sum - tok.loss_sum + 0.3 * tok.ce_sum
    torch.testing.assert_close(cut.loss_sum, expected)
    assert cut.n_tokens == full.n_tokens == 23
    assert not torch.allclose(cut.loss_sum, full.loss_sum)


def test_padding_contributes_nothing_and_gets_no_gradient():
    case = random_case(seed=2, pad=(0, 7, 22))
    cfg = LossConfig(divergence="jsd", ce_weight=0.2, chunk_size=4)
    hidden = case["hidden"].clone().requires_grad_(True)
    tw = torch.ones(3, 23, dtype=torch.float64)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    out = distill_loss(hidden, case["weight"], case["bias"], sig, case["targets"], tw, cfg)
    out.loss_sum.backward()
    keep = case["targets"] != IGNORE
    assert out.n_tokens == 20
    assert hidden.grad[~keep].abs().max().item() == 0.0
    assert hidden.grad[keep].abs().min().item() > 0.0
    sub = TeacherSignal(case["ids"][:, keep], case["logprobs"][:, keep], case["log_residual"][:, keep])
    ref = distill_loss(case["hidden"][keep], case["weight"], case["bias"], sub, case["targets"][keep],
                       tw[:, keep], cfg)
    torch.testing.assert_close(out.loss_sum.detach(), ref.loss_sum)
    torch.testing.assert_close(out.teacher_div_sums, ref.teacher_div_sums)


@pytest.mark.parametrize("chunk_size", [1, 3, 22, 23, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    case = random_case(seed=8, bias=False)
    cfg = LossConfig(divergence="skew_kl", weighting="min_ce_sequence", ce_weight=0.1, temperature=1.3,
                     chunk_size=chunk_size)
    _assert_match(case, cfg, _token_weights(case, "min_ce_sequence"), rtol=1e-9, grad_rtol=1e-7)


def test_ce_weight_mixes_linearly():
    case = random_case(seed=4)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    tw = torch.ones(3, 23, dtype=torch.float64)
    pure = distill_loss(case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw,
                        LossConfig(divergence="tvd", chunk_size=8))
    for c in (0.1, 0.9):
        mixed = distill_loss(case["hidden"], case["weight"], case["bias"], sig, case["targets"], tw,
                             LossConfig(divergence="tvd", ce_weight=c, chunk_size=8))
        torch.testing.assert_close(mixed.loss_sum, (1 - c) * pure.loss_sum + c * pure.ce_sum)
    ce = torch.nn.functional.cross_entropy(case["hidden"] @ case["weight"].t() + case["bias"], case["targets"],
                                           ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(pure.ce_sum, ce)


def test_empty_batch_gives_zero_loss_and_zero_gradients():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    sig = TeacherSignal(torch.zeros(2, 0, 4, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0))
    out = distill_loss(hidden, weight, None, sig, torch.zeros(0, dtype=torch.long), torch.ones(2, 0),
                       LossConfig())
    out.loss_sum.backward()
    assert out.n_tokens == 0 and out.loss_sum.item() == 0.0
    assert weight.grad is not None and weight.grad.abs().sum().item() == 0.0
    assert math.isfinite(out.ce_sum.item())


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
def test_row_blocks_inside_a_chunk_do_not_change_the_result(divergence, monkeypatch):
    import distill.loss.chunked as chunked

    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * 97 + 5)  # 2 rows per block, chunks of 5 rows
    case = random_case(seed=21)
    cfg = LossConfig(divergence=divergence, weighting="soft_ce", ce_weight=0.3, temperature=0.8, chunk_size=5)
    _assert_match(case, cfg, _token_weights(case, "soft_ce"), rtol=1e-9, grad_rtol=1e-7)


def test_low_precision_head_is_upcast_per_block(monkeypatch):
    import distill.loss.chunked as chunked

    case = random_case(seed=22, dtype=torch.float32, vocab=211, m=40)
    tw = _token_weights(case, "fixed")
    cfg = LossConfig(divergence="forward_kl", ce_weight=0.2, chunk_size=16)
    results = []
    for block in (1 << 23, 3 * 211):
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", block)
        leaves = [case[k].to(torch.bfloat16).requires_grad_(True) for k in ("hidden", "weight")]
        out = distill_loss(*leaves, None, TeacherSignal(case["ids"], case["logprobs"], case["log_residual"]),
                           case["targets"], tw, cfg)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), leaves[0].grad, leaves[1].grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # only the order of the loss sum changes
    leaves = [case[k].to(torch.bfloat16).float().requires_grad_(True) for k in ("hidden", "weight")]
    dense = dense_loss(*leaves, None, case["ids"], case["logprobs"], case["log_residual"], case["targets"], tw, cfg)[0]
    dense.backward()
    torch.testing.assert_close(results[0][0], dense.detach(), rtol=4e-3, atol=0)  # bf16 logits: ~3 digits
    for got, ref in zip(results[0][1:], (leaf.grad for leaf in leaves)):
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.02 * scale)


# ---------------------------------------------------------------- the model's logit transform

# Gemma 2's softcap, Granite's 1/logits_scaling (< 1), Cohere's logit_scale (> 1), and both at once.
TRANSFORMS = {"softcap": dict(softcap=2.0), "scale_down": dict(scale=0.25), "scale_up": dict(scale=6.0),
              "scale_and_softcap": dict(scale=3.0, softcap=1.5)}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_logit_transform_matches_dense(divergence, transform):
    """Values and hidden/weight/bias gradients through the transform, then the temperature (fp64, tight)."""
    case = random_case(seed=30 + sorted(TRANSFORMS).index(transform))
    cfg = LossConfig(divergence=divergence, weighting="soft_ce", temperature=1.7, ce_weight=0.25, beta=0.3,
                     skew_alpha=0.2, chunk_size=5)
    tw = _token_weights(case, "soft_ce")
    got, _ = _assert_match(case, cfg, tw, rtol=1e-9, grad_rtol=1e-7, **TRANSFORMS[transform])
    (plain, _), _ = _run_both(case, cfg, tw)
    # The transform changes the result: a loss that ignored it would fail the match above.
    assert abs(got[0].item() - plain[0].item()) > 1e-3 * abs(plain[0].item())


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_logit_transform_fp32_within_tolerance(transform):
    case = random_case(dtype=torch.float32, vocab=211, m=40, seed=40)
    case["weight"] = case["weight"] / 3  # milder logits: the dense reference's fp32 probabilities underflow at x6
    for T in (1.0, 2.0):  # T == 1 takes the path where the logits are not divided in place
        cfg = LossConfig(divergence="forward_kl", weighting="min_ce_token", temperature=T, ce_weight=0.1,
                         chunk_size=16)
        _assert_match(case, cfg, _token_weights(case, "min_ce_token"), rtol=1e-5, grad_rtol=1e-4,
                      **TRANSFORMS[transform])


def test_saturated_softcap_gradient_vanishes_like_tanh():
    """Far into tanh's flat tail the logits' gradient is ~0, as autograd through the model gives."""
    case = random_case(seed=41)
    case["weight"] = case["weight"] * 50  # |z| >> softcap: most logits saturate
    cfg = LossConfig(divergence="jsd", ce_weight=0.5, chunk_size=7)
    _assert_match(case, cfg, _token_weights(case, "fixed"), rtol=1e-9, grad_rtol=1e-7, softcap=1.0)


def test_low_precision_head_applies_the_transform_in_fp32():
    """A bf16 head's logits are upcast per block before the transform: close to fp32 through the same transform."""
    case = random_case(seed=42, dtype=torch.float32, vocab=211, m=40)
    tw = _token_weights(case, "fixed")
    cfg = LossConfig(divergence="forward_kl", ce_weight=0.2, temperature=1.5, chunk_size=16)
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    leaves = [case[k].to(torch.bfloat16).requires_grad_(True) for k in ("hidden", "weight")]
    out = distill_loss(*leaves, None, sig, case["targets"], tw, cfg,
                       logit_transform=LogitTransform(scale=0.5, softcap=2.0))
    out.loss_sum.backward()
    ref_leaves = [case[k].to(torch.bfloat16).float().requires_grad_(True) for k in ("hidden", "weight")]
    dense = dense_loss(*ref_leaves, None, case["ids"], case["logprobs"], case["log_residual"], case["targets"], tw,
                       cfg, scale=0.5, softcap=2.0)[0]
    dense.backward()
    torch.testing.assert_close(out.loss_sum, dense.detach(), rtol=4e-3, atol=0)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.float(), ref.grad, rtol=0.05, atol=0.02 * ref.grad.abs().max().item())


def test_fp32_head_under_bf16_autocast_multiplies_in_bf16_and_returns_fp32_gradients():
    """fp32 master weights under bf16 autocast (the trainer on a GPU): the head matmuls take bf16
    operands, as a dense head under autocast would (fp32 ones would be the step's slowest matmul),
    so the loss equals that of bf16-rounded leaves without autocast; the gradients are fp32 (the
    head's accumulated in fp32 across chunks) and match the dense fp32 reference within bf16's
    tolerance (as in the bf16-head test above)."""
    case = random_case(seed=23, dtype=torch.float32, vocab=211, m=40)
    tw = _token_weights(case, "fixed")
    cfg = LossConfig(divergence="forward_kl", ce_weight=0.2, chunk_size=16)  # 3 chunks
    sig = TeacherSignal(case["ids"], case["logprobs"], case["log_residual"])
    names = ("hidden", "weight", "bias")

    def run(dtype, autocast):
        leaves = [case[k].to(dtype).requires_grad_(True) for k in names]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = distill_loss(*leaves, sig, case["targets"], tw, cfg)
        out.loss_sum.backward()
        return out.loss_sum.detach(), [leaf.grad for leaf in leaves]

    loss, grads = run(torch.float32, autocast=True)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    loss_bf16_leaves, _ = run(torch.bfloat16, autocast=False)
    torch.testing.assert_close(loss, loss_bf16_leaves, rtol=1e-6, atol=0)  # same bf16 logits
    loss_fp32, _ = run(torch.float32, autocast=False)
    assert not torch.allclose(loss, loss_fp32, rtol=1e-5, atol=0)  # fp32 logits differ: autocast was applied
    ref_leaves = [case[k].requires_grad_(True) for k in names]
    dense = dense_loss(*ref_leaves, case["ids"], case["logprobs"], case["log_residual"], case["targets"], tw, cfg)[0]
    dense.backward()
    torch.testing.assert_close(loss, dense.detach(), rtol=4e-3, atol=0)
    for got, leaf in zip(grads, ref_leaves):
        scale = leaf.grad.abs().max().item()
        torch.testing.assert_close(got, leaf.grad, rtol=0.05, atol=0.02 * scale)
