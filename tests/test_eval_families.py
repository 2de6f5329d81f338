"""Choice scoring on every attention layout users bring, in fp32 and bf16.

Tiny random-init Llama, Mistral, Qwen2, Gemma 2, Gemma 3, Llama 4 and LFM2 models (hidden 32,
2 layers: full, sliding-window (6-8 tokens), hybrid, chunked (4 tokens), conv + attention),
prompts shorter and longer than the window in one batch: batched, cached scores equal one
unbatched forward of the model over prompt + choice.
"""

import pytest
import torch
from test_eval_models import ANY_PADDING, BOS, EOS, PAD, TOK, reference_choice_score
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Llama4ForCausalLM, Llama4TextConfig, Lfm2Config, Lfm2ForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from distill.evaluation import build_examples, load_task
from distill.evaluation.loglik import score_choices, shared_cache

WINDOW = 8
COMMON = dict(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
              initializer_range=0.1)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON)),
    "mistral": (MistralForCausalLM, MistralConfig(sliding_window=WINDOW, **COMMON)),
    # Layer 0 full attention, layer 1 sliding (max_window_layers counts the full layers first).
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                            **COMMON)),
    # Sliding and full layers alternate; attention and final-logit softcapping.
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(sliding_window=WINDOW, final_logit_softcapping=3.0, **COMMON)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(sliding_window=6, layer_types=["sliding_attention",
                                                                                   "full_attention"], **COMMON)),
    # Chunked attention (restarts every 4 tokens; its cache layers are sliding ones) and a 2-expert MoE.
    "llama4": (Llama4ForCausalLM, Llama4TextConfig(attention_chunk_size=4, num_local_experts=2,
                                                   intermediate_size_mlp=64, **COMMON)),
    # A short convolution layer, then full attention: its conv state cannot be cropped.
    "lfm2": (Lfm2ForCausalLM, Lfm2Config(layer_types=["conv", "full_attention"], **COMMON)),
}
# Per family, which cache layers are sliding; None: the cache is not shared (full sequences instead).
SLIDING = {"llama": [False, False], "mistral": [True, True], "qwen2": [False, True], "gemma2": [True, False],
           "gemma3": [True, False], "llama4": [True, True],
           "lfm2": None}

# With BOS: 2, 6, 10 and 35 tokens, around and far past the window; choices of 1-8 tokens,
# so prompt + choice crosses the window in some rows and not in others.
PROMPTS = ["x", "Pick:", "Q: is it?", "A much longer question, with commas: yes?"]
CHOICES = [("a",), ("red", "green", "blue"), ("No", "Yes"), ("False", "True", "Maybe so")]


def family_model(name: str):
    cls, config = FAMILIES[name]
    torch.manual_seed(0)
    return cls(config).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cache_sharing_is_decided_from_the_layers(name):
    cache = shared_cache(family_model(name))
    if SLIDING[name] is None:
        assert cache is None
        return
    assert cache is not None and cache.is_sliding == SLIDING[name]
    assert all(layer.record_past for layer in cache.layers if layer.is_sliding)  # so that crop rolls back exactly


@pytest.mark.parametrize("protocol", ["competition", "standard"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_batched_scores_equal_the_unbatched_forward(name, protocol):
    model = family_model(name)
    expected = [reference_choice_score(model, TOK, p, c, protocol) for p, cs in zip(PROMPTS, CHOICES) for c in cs]
    for batch_size, reuse_cache in [(4, True), (3, True), (1, True), (4, False)]:
        got, _ = score_choices(model, TOK, PROMPTS, CHOICES, protocol, batch_size, reuse_cache=reuse_cache,
                               max_padding=ANY_PADDING)
        assert [len(g) for g in got] == [len(cs) for cs in CHOICES]
        torch.testing.assert_close(torch.tensor([s for row in got for s in row]), torch.tensor(expected),
                                   rtol=0, atol=1e-4, msg=lambda m: f"batch {batch_size}, cache {reuse_cache}: {m}")



def fp32_head_logits(model, ids):
    """[T, V]: the logits from the model's own (bf16) final hidden states, with the LM head and
    the family's final softcapping computed in fp32, written out plainly."""
    hidden = model.model(ids).last_hidden_state[0].float()
    z = hidden @ model.lm_head.weight.float().T
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(z / cap) if cap else z


# Batched and unbatched bf16 scores may differ by this much (nats per choice). Padding changes
# the shapes of the body's matmuls and attention, and with them which bf16 roundings happen
# (8 significant bits): measured up to 0.014 on these models. 0.05 leaves a margin, is ~50x
# below the smallest gap between two choices here (>= 2.5), and ~10x below one bf16 ulp of a
# logit of 16 (0.125), the rounding that fp32 logits remove.
BF16_TOL = 0.05


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_scores_come_from_fp32_logits_and_batching_keeps_predictions(name):
    model = family_model(name).to(torch.bfloat16)
    examples = build_examples(load_task("boolq"), limit=20)
    prompts, choices = [e.prompt[-150:] for e in examples], [e.choices for e in examples]  # 150 tokens > window
    for protocol in ("competition", "standard"):
        expected = torch.tensor([[reference_choice_score(model, TOK, p, c, protocol, logits_of=fp32_head_logits)
                                  for c in cs] for p, cs in zip(prompts, choices)])
        bf16_logits = torch.tensor([[reference_choice_score(model, TOK, p, c, protocol) for c in cs]
                                    for p, cs in zip(prompts[:4], choices[:4])])
        assert not torch.allclose(bf16_logits, expected[:4], rtol=0, atol=1e-4)  # the tolerance below can tell
        # One unpadded prompt+choice row at a time runs the reference's exact shapes, so the same
        # bf16 hidden states: only the fp32 head's summation order may differ.
        alone, _ = score_choices(model, TOK, [p for p, cs in zip(prompts, choices) for _ in cs],
                                 [(c,) for cs in choices for c in cs], protocol, batch_size=1, reuse_cache=False)
        torch.testing.assert_close(torch.tensor(alone).view_as(expected), expected, rtol=0, atol=1e-4)
        for batch_size, reuse_cache in [(20, True), (7, True), (20, False)]:
            got, _ = score_choices(model, TOK, prompts, choices, protocol, batch_size, reuse_cache=reuse_cache,
                                   max_padding=ANY_PADDING)
            got = torch.tensor(got)
            torch.testing.assert_close(got, expected, rtol=0, atol=BF16_TOL)
            assert got.argmax(-1).tolist() == expected.argmax(-1).tolist(), (protocol, batch_size, reuse_cache)
