"""How each protocol tokenizes a choice, with real BPE tokenizers (a byte-level one trained here, SmolLM2's)."""

import pytest
import torch
from conftest import needs_smollm_wheel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill.evaluation import build_examples, load_task
from distill.evaluation.loglik import continuation_ids, encode_choices, score_choices, split_context

PROMPTS = ["Is the sky blue?\nAnswer:", "Passage: water is wet.\nQuestion: is water wet? True or False?"]
CHOICES = [("No", "Yes"), ("False", "True")]


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE (SmolLM2's kind): a space is glued to the word after it."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [f"{p} {c}" for p, cs in zip(PROMPTS, CHOICES) for c in cs] * 20 + ["Yes No True False"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_standard_takes_the_choice_as_it_reads_after_the_prompt(bpe):
    assert len(plain(bpe, " Yes")) == 1 and plain(bpe, " Yes") != plain(bpe, "Yes")  # the case that matters
    prompt_ids, choice_ids = encode_choices(bpe, PROMPTS, CHOICES, "standard")
    assert prompt_ids == [plain(bpe, p) for p in PROMPTS]
    assert choice_ids == [[plain(bpe, " " + c) for c in cs] for cs in CHOICES]
    _, competition = encode_choices(bpe, PROMPTS, CHOICES, "competition")  # the starter kit's, unchanged
    assert competition == [[plain(bpe, c) + [bpe.eos_token_id] for c in cs] for cs in CHOICES]


@torch.no_grad()
def test_standard_score_is_log_p_of_the_choice_tokens_in_context(bpe):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    got, _ = score_choices(model, bpe, PROMPTS, CHOICES, "standard", batch_size=2, max_padding=100.0)
    for prompt, choices, scores in zip(PROMPTS, CHOICES, got):
        n = len(plain(bpe, prompt))
        for choice, score in zip(choices, scores):
            ids = plain(bpe, f"{prompt} {choice}")  # the whole text, tokenized once
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            assert score == pytest.approx(sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids))), abs=1e-4)


@pytest.mark.parametrize("prompt, choice, context, continuation", [
    ("Answer:", "Yes", "Answer:", " Yes"),        # one space separates them
    ("Answer: ", "Yes", "Answer:", " Yes"),       # the prompt's own trailing space moves to the choice
    ("Q?\n", "Yes", "Q?", "\nYes"),               # ... any trailing whitespace, and no space is added
    ("Answer:", " Yes", "Answer:", " Yes"),       # a choice that starts with whitespace brings its own
    ("Answer:", "", "Answer:", ""),
])
def test_split_context(prompt, choice, context, continuation):
    assert split_context(prompt, choice) == (context, continuation)


def test_a_token_across_the_boundary_keeps_the_text():
    # A char-level BPE with one merge, ":" + " " -> ": ": "Answer: Yes" has no token boundary
    # after "Answer:". Taking the whole's tokens after the prompt's count (lm-eval's rule) would
    # drop the space; the continuation tokenized alone spells it.
    vocab = {"<pad>": 0, "</s>": 1, ": ": 2, **{c: 3 + i for i, c in enumerate("Answer: Y")}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[(":", " ")])),
                                  pad_token="<pad>", eos_token="</s>")
    tok.backend_tokenizer.decoder = decoders.Fuse()
    context, continuation = split_context("Answer:", "Y")
    whole, ctx = plain(tok, context + continuation), plain(tok, context)
    assert whole[:len(ctx)] != ctx  # the merge straddles the boundary
    (cont,) = continuation_ids(tok, [context], [continuation])
    assert tok.decode(ctx + cont) == "Answer: Y" and tok.decode(ctx + whole[len(ctx):]) == "Answer:Y"


@pytest.mark.smollm
@needs_smollm_wheel
def test_smollm2_boolq_choices_in_context():
    from distill.smollm import smollm2_path

    tok = PreTrainedTokenizerFast.from_pretrained(smollm2_path())
    examples = build_examples(load_task("boolq"), limit=10)  # one example per template
    prompts, choices = [e.prompt for e in examples], [e.choices for e in examples]
    _, standard = encode_choices(tok, prompts, choices, "standard")
    _, competition = encode_choices(tok, prompts, choices, "competition")
    for cs, std, comp in zip(choices, standard, competition):
        for c, s, k in zip(cs, std, comp):
            assert tok.convert_ids_to_tokens(s) == ["Ġ" + c]  # " Yes", as after "Answer:" in running text
            assert k == plain(tok, c) + [tok.eos_token_id] and tok.convert_ids_to_tokens(k[:1]) == [c]
