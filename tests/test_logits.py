"""distill.logits on real tiny models: each family's own logits, in capture and in the chunked loss."""

from __future__ import annotations

import pytest
import torch
from loss_reference import IGNORE, dense_loss_from_logits, sparse_signal

from distill.cache.capture import teacher_topk
from distill.config import LossConfig
from distill.errors import DistillError
from distill.logits import FAMILIES, IDENTITY, LogitTransform, logit_transform, model_logits
from distill.loss import TeacherSignal, example_weights
from distill.train import StudentWithLoss

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
MOE = dict(num_local_experts=2, num_experts_per_tok=1)

# (ForCausalLM class, config class, config keys, the transform distill must find). The first three
# are the issue's families with realistic values (Cohere's 0.0625 and Granite's 8 are their defaults'
# order); the rest pin every FAMILIES entry to the transformers model it was read from.
CASES = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(final_logit_softcapping=2.0), LogitTransform(softcap=2.0)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(logit_scale=0.0625), LogitTransform(scale=0.0625)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(logits_scaling=8.0), LogitTransform(scale=0.125)),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(final_logit_softcapping=2.0, sliding_window=4),
                    LogitTransform(softcap=2.0)),
    "vaultgemma": ("VaultGemmaForCausalLM", "VaultGemmaConfig", dict(final_logit_softcapping=2.0),
                   LogitTransform(softcap=2.0)),
    "nanochat": ("NanoChatForCausalLM", "NanoChatConfig", dict(final_logit_softcapping=2.0),
                 LogitTransform(softcap=2.0)),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
                        dict(logits_soft_cap=2.0, lru_width=32, attention_window_size=4), LogitTransform(softcap=2.0)),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", dict(logit_scale=4.0, sliding_window=4),
                LogitTransform(scale=4.0)),
    "cohere2_moe": ("Cohere2MoeForCausalLM", "Cohere2MoeConfig",
                    dict(logit_scale=4.0, sliding_window=4, num_experts=2, num_experts_per_tok=1,
                         moe_intermediate_size=16), LogitTransform(scale=4.0)),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(logits_scaling=0.5, **MOE),
                   LogitTransform(scale=2.0)),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", dict(logits_scaling=0.5, **MOE),
                         LogitTransform(scale=2.0)),
    "granite_swa": ("GraniteSWAForCausalLM", "GraniteSWAConfig", dict(logits_scaling=0.5, sliding_window=4),
                    LogitTransform(scale=2.0)),
    "granitemoe_swa": ("GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig",
                       dict(logits_scaling=0.5, sliding_window=4, **MOE), LogitTransform(scale=2.0)),
    "hyperclovax": ("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", dict(logits_scaling=4.0), LogitTransform(scale=4.0)),
    "minicpm3": ("MiniCPM3ForCausalLM", "MiniCPM3Config",
                 dict(num_key_value_heads=4, dim_model_base=8, qk_nope_head_dim=8, qk_rope_head_dim=4, kv_lora_rank=8,
                      q_lora_rank=8, v_head_dim=8), LogitTransform(scale=0.25)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, IDENTITY),
}
ISSUE_FAMILIES = ["gemma2", "cohere", "granite"]


def _model(name, dtype=torch.float32):
    cls, cfg_cls, extra, _ = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**(COMMON | extra))).to(dtype).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std init, so softcaps saturate and scales matter
        model.get_output_embeddings().weight.mul_(20)
    return model


def _batch():
    """input_ids / attention_mask [3, 10] (the last row right-padded), select [3, 9]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[2, 7:] = 0
    select = torch.zeros(3, 9, dtype=torch.bool)
    select[:, 3:] = True
    select[2, 6:] = False  # predictions of padding are not targets
    return ids, attn, select


def _own_logprobs(model, ids, attn, select):
    """log_softmax of the model's own forward logits at the selected positions: [M, V]."""
    return torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1][select].double(), dim=-1)


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) - {"mpt"} <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_logits_equal_the_models_own(name):
    model = _model(name)
    assert logit_transform(model) == CASES[name][3]
    ids, attn, _ = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        got = model_logits(model, out.hidden_states[-1])
        raw = model.get_output_embeddings()(out.hidden_states[-1])
    torch.testing.assert_close(got, out.logits, rtol=1e-5, atol=1e-5)
    if name != "llama":  # the transform matters here: raw head outputs are not the logits
        assert (raw - out.logits).abs().max().item() > 0.1


def test_unknown_transform_is_refused_and_mpt_is_identity():
    cfg = transformers.Gemma3nTextConfig(**COMMON, final_logit_softcapping=30.0)
    with pytest.raises(DistillError, match=r"gemma3n_text.*final_logit_softcapping=30\.0"):
        logit_transform(cfg)
    assert logit_transform(transformers.Gemma2Config(**COMMON, final_logit_softcapping=None)) == IDENTITY
    mpt = transformers.MptForCausalLM(transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB,
                                                             logit_scale=4.0)).eval()
    assert logit_transform(mpt) == IDENTITY  # transformers' MPT does not apply its logit_scale
    ids, attn, _ = _batch()
    with torch.no_grad():
        out = mpt(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        torch.testing.assert_close(model_logits(mpt, out.hidden_states[-1]), out.logits)


@pytest.mark.parametrize("name", ISSUE_FAMILIES)
def test_capture_caches_the_models_own_distribution(name):
    model = _model(name)
    ids, attn, select = _batch()
    with torch.no_grad():
        ref = _own_logprobs(model, ids, attn, select)
    for k in (VOCAB, 8):
        top_ids, top_lp, log_res = teacher_topk(model, ids, attn, select, k, row_chunk=5)
        torch.testing.assert_close(top_lp.double(), ref.gather(1, top_ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(top_ids[:, 0], ref.argmax(-1))
        if k < VOCAB:
            rest = ref.scatter(1, top_ids, float("-inf")).logsumexp(-1)
            torch.testing.assert_close(log_res.double(), rest, rtol=1e-4, atol=1e-4)


def _signal_and_weights(select, m):
    g = torch.Generator().manual_seed(2)
    teacher_logits = 3 * torch.randn(2, m, VOCAB, generator=g)
    signal = TeacherSignal(*sparse_signal(teacher_logits, 16))
    per_example = example_weights([1.0, 0.5], [["math"], []], ["math", "code", None], "route")  # 0 on sample 1
    row_sample = torch.repeat_interleave(torch.arange(3), select.sum(1))  # as batches.collate builds it
    return signal, per_example[:, row_sample], row_sample


@pytest.mark.parametrize("weighting", ["fixed", "min_ce_sequence"])
@pytest.mark.parametrize("name", ISSUE_FAMILIES)
def test_student_loss_equals_dense_from_the_models_logits(name, weighting):
    """StudentWithLoss (the trainer's forward) against autograd through model(...).logits."""
    model = _model(name)
    ids, attn, select = _batch()
    targets = ids[:, 1:][select]
    targets[-1] = IGNORE  # one padding target inside the selection
    signal, tw, row_sample = _signal_and_weights(select, len(targets))
    cfg = LossConfig(divergence="forward_kl", weighting=weighting, temperature=1.5, ce_weight=0.2, chunk_size=4)
    results = []
    for dense in (False, True):
        model.zero_grad(set_to_none=True)
        if dense:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][select]
            loss, n, div, share, ce = dense_loss_from_logits(logits, signal.ids, signal.logprobs, signal.log_residual,
                                                             targets, tw, cfg, sequence_index=row_sample)
        else:
            out = StudentWithLoss(model, cfg)(ids, attn, select, targets, signal, tw)
            loss, n, div, share, ce = out["loss_sum"], out["n_tokens"], out["div"], out["share"], out["ce"]
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append(((loss.detach(), div, share, ce), n, grads))
    (got, n_got, got_g), (ref, n_ref, ref_g) = results
    assert n_got == n_ref == 14
    for a, b in zip(got, ref):  # ce: the student's log-probs of the gold tokens, summed
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    assert set(got_g) == set(ref_g) and len(ref_g) == len([p for p in model.parameters() if p.requires_grad])
    for key, g in ref_g.items():
        scale = g.abs().max().item()
        if scale == 0:  # e.g. an unused MoE expert or a padding embedding row
            assert got_g[key].abs().max().item() == 0, key
            continue
        torch.testing.assert_close(got_g[key], g, rtol=1e-4, atol=1e-4 * scale, msg=key)
