"""distill.loss end to end on a tiny tied-embedding Llama: same loss and parameter gradients as the dense path."""

from __future__ import annotations

import pytest
import torch
from loss_reference import dense_loss, sparse_signal

from distill.config import LossConfig
from distill.loss import TeacherSignal, distill_loss, example_weights

transformers = pytest.importorskip("transformers")


def _tiny_llama(vocab=160):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so the divergences are not all ~0
        model.get_input_embeddings().weight.mul_(20)
    return model


def _batch(vocab, n_teachers=2, k=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    select = torch.zeros(3, 11, dtype=torch.bool)  # predicting token t+1 from position t
    select[:, 5:] = True  # "response" tokens only
    select[2, 9:] = False  # a shorter sample
    m = int(select.sum())
    teacher_logits = 3 * torch.randn(n_teachers, m, vocab, generator=g)
    signal = TeacherSignal(*sparse_signal(teacher_logits, k))
    per_example = example_weights([1.0, 0.5], [["math"], []], ["math", "code", None], "route")
    sample_of_token = torch.arange(3).unsqueeze(1).expand(3, 11)[select]
    return ids, select, signal, per_example[:, sample_of_token]


def _loss_and_grads(model, ids, select, signal, token_weights, cfg, dense):
    model.zero_grad(set_to_none=True)
    out = model(ids, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1][select]  # after the final norm
    targets = ids[:, 1:][select]
    head = model.get_output_embeddings().weight
    if dense:
        loss, n, divs, shares, ce = dense_loss(hidden, head, None, signal.ids, signal.logprobs, signal.log_residual,
                                               targets, token_weights, cfg)
    else:
        res = distill_loss(hidden, head, None, signal, targets, token_weights, cfg)
        loss, n, divs, shares, ce = (res.loss_sum, res.n_tokens, res.teacher_div_sums,
                                     res.teacher_weight_sums, res.ce_sum)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return (loss.detach(), n, divs, shares, ce), grads


@pytest.mark.parametrize("divergence,weighting", [("forward_kl", "route"), ("jsd", "soft_ce"), ("tvd", "min_ce_token")])
def test_tied_llama_chunked_equals_dense(divergence, weighting):
    model = _tiny_llama()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, select, signal, tw = _batch(model.config.vocab_size)
    cfg = LossConfig(divergence=divergence, weighting=weighting, temperature=1.5, ce_weight=0.2, chunk_size=7)
    got, got_g = _loss_and_grads(model, ids, select, signal, tw, cfg, dense=False)
    ref, ref_g = _loss_and_grads(model, ids, select, signal, tw, cfg, dense=True)
    assert got[1] == ref[1] == 16
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(got_g) == set(ref_g) and len(ref_g) == len(list(model.parameters()))
    for name, g in ref_g.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_tied_llama_trains_on_the_chunked_loss():
    model = _tiny_llama()
    ids, select, signal, tw = _batch(model.config.vocab_size)
    cfg = LossConfig(divergence="forward_kl", chunk_size=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        (loss, n, *_), _ = _loss_and_grads(model, ids, select, signal, tw, cfg, dense=False)
        opt.step()
        losses.append(loss.item() / n)
    assert losses[-1] < 0.8 * losses[0], losses


def test_lora_student_chunked_equals_dense():
    """A peft LoRA student: the chunked loss gives the dense path's adapter gradients, and
    the frozen base (head included) gets none."""
    from peft import LoraConfig, get_peft_model

    # float64: the adapter's gradients are small next to the loss (the scaled embeddings dominate
    # the residual stream), so float32 rounding would swamp the comparison.
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).double()  # B != 0: it acts
    ids, select, signal, tw = _batch(model.config.vocab_size)
    signal = TeacherSignal(signal.ids, signal.logprobs.double(), signal.log_residual.double())
    tw = tw.double()
    cfg = LossConfig(divergence="skew_kl", weighting="soft_ce", chunk_size=6)
    got, got_g = _loss_and_grads(model, ids, select, signal, tw, cfg, dense=False)
    ref, ref_g = _loss_and_grads(model, ids, select, signal, tw, cfg, dense=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ref_g) == set(got_g) == trainable and len(trainable) == 8  # A and B, q and v, 2 layers
    for name, g in ref_g.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got_g[name], g, rtol=1e-7, atol=1e-7 * scale, msg=name)
