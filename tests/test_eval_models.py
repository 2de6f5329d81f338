"""Scoring and generation on tiny random Llama models, against direct unbatched computations."""

import json
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill.config import EvalConfig
from distill.errors import DistillError
from distill.evaluation import ModelEntry, build_examples, evaluate_models, load_task
from distill.evaluation.generation import generate
from distill.evaluation.loglik import score_choices, score_choices_protocols

PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


def char_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable character, like the synthetic experiment's tokenizer."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    for c in sorted(set(string.printable) - set("\x0b\x0c")):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, eos_bias: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    if eos_bias:  # make EOS likely enough that some continuations end early
        head = torch.nn.Linear(32, vocab_size, bias=True)
        head.weight.data.copy_(model.lm_head.weight.data)
        head.bias.data.zero_()
        head.bias.data[EOS] = eos_bias
        model.lm_head = head
    return model


TOK = char_tokenizer()
# Let batches carry any amount of padding, so the tests exercise padded rows (on CPU the
# default budget keeps batches nearly pad-free, and prompts of mixed lengths would run alone).
ANY_PADDING = 100.0


# ------------------------------------------------------------ direct references


def prompt_ids(tok, prompt, max_tokens=None):
    ids = tok(prompt)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


def reference_tokens(tok, prompt, choice, protocol, max_tokens=None):
    """(prompt ids, choice ids, which choice tokens are summed), each protocol's rule written out plainly."""
    if protocol == "competition":  # the choice alone, EOS appended, and the first choice token not counted
        c = tok(choice, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return prompt_ids(tok, prompt, max_tokens), c, range(1, len(c))
    # standard: the text prompt + " " + choice tokenized whole; the choice's tokens are those after the prompt's
    whole, n = tok(prompt + " " + choice)["input_ids"], len(tok(prompt)["input_ids"])
    return prompt_ids(tok, prompt, max_tokens), whole[n:], range(len(whole) - n)


@torch.no_grad()
def reference_choice_score(model, tok, prompt, choice, protocol, max_tokens=None, logits_of=None):
    """One unpadded forward pass over prompt + choice; the protocol's sum written plainly.

    logits_of(model, ids [1, T]) -> [T, V] fp32; default the model's own `forward` logits.
    """
    p, c, counted = reference_tokens(tok, prompt, choice, protocol, max_tokens)
    ids = torch.tensor([p + c])
    logits = model(ids).logits[0].float() if logits_of is None else logits_of(model, ids)
    logp = logits.log_softmax(-1)
    return sum(logp[len(p) + t - 1, c[t]].item() for t in counted)


@torch.no_grad()
def reference_greedy(model, tok, prompt, max_new, stop=()):
    """Greedy decoding one token at a time, no cache, no padding."""
    ids, new = prompt_ids(tok, prompt), []
    for _ in range(max_new):
        t = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            return cut_at(tok.decode(new, skip_special_tokens=True), stop), True
        new.append(t)
    return cut_at(tok.decode(new, skip_special_tokens=True), stop), False


def cut_at(text, stop):
    for s in stop:
        text = text.split(s)[0]
    return text


# ------------------------------------------------------------ choice scoring


@pytest.mark.parametrize("protocol", ["competition", "standard"])
def test_boolq_scores_batched_equal_unbatched(protocol):
    spec = load_task("boolq")
    examples = build_examples(spec, limit=6)
    model = tiny_llama(len(TOK))
    prompts, choices = [e.prompt for e in examples], [e.choices for e in examples]
    expected = [[reference_choice_score(model, TOK, e.prompt, c, protocol, spec.max_prompt_tokens) for c in e.choices]
                for e in examples]
    for batch_size, reuse_cache in [(6, True), (4, True), (1, True), (6, False)]:
        got, n_tokens = score_choices(model, TOK, prompts, choices, protocol, batch_size,
                                      spec.add_bos, spec.max_prompt_tokens, reuse_cache, max_padding=ANY_PADDING)
        assert n_tokens > 0
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=2e-4)


@pytest.mark.parametrize("protocol", ["competition", "standard"])
def test_ragged_choices_batched_equal_unbatched(protocol):
    # Different prompt lengths, 1-4 choices of 1-7 tokens: exercises both paddings and the cache repeat.
    prompts = ["Q: is it?", "A much longer question, with commas, here: yes or no?", "x", "Pick one:"]
    choices = [("No", "Yes"), ("False", "True", "Maybe so"), ("a",), ("red", "green", "blue", "b")]
    model = tiny_llama(len(TOK), seed=1)
    expected = [[reference_choice_score(model, TOK, p, c, protocol) for c in cs] for p, cs in zip(prompts, choices)]
    for batch_size in (4, 3, 1):
        for reuse_cache in (True, False):
            got, _ = score_choices(model, TOK, prompts, choices, protocol, batch_size, reuse_cache=reuse_cache,
                                   max_padding=ANY_PADDING)
            flat = [s for row in got for s in row]
            torch.testing.assert_close(torch.tensor(flat), torch.tensor([s for r in expected for s in r]),
                                       rtol=0, atol=1e-4)


def test_both_protocols_in_shared_passes_equal_each_alone():
    # "Pick one: " ends in whitespace: its standard prompt tokens differ from the competition ones,
    # so it runs twice; the other prompts run once with all four choice slots.
    prompts = ["Q: is it?", "A much longer question, with commas, here: yes or no?", "Pick one: ", "x"]
    choices = [("No", "Yes"), ("False", "True", "Maybe so"), ("red", "green"), ("a",)]
    model = tiny_llama(len(TOK), seed=2)
    for reuse_cache in (True, False):
        both, n_both = score_choices_protocols(model, TOK, prompts, choices, ["competition", "standard"], 3,
                                               reuse_cache=reuse_cache, max_padding=ANY_PADDING)
        seen = []
        alone = {}
        n_alone = 0
        for protocol in ("competition", "standard"):
            alone[protocol], n = score_choices(model, TOK, prompts, choices, protocol, 3, reuse_cache=reuse_cache,
                                               max_padding=ANY_PADDING, on_batch=seen.append)
            n_alone += n
            assert [len(r) for r in both[protocol]] == [len(c) for c in choices]
            torch.testing.assert_close(torch.tensor([x for r in both[protocol] for x in r]),
                                       torch.tensor([x for r in alone[protocol] for x in r]), rtol=0, atol=1e-5)
        assert sum(seen) == 2 * len(prompts)
        # the shared passes process fewer tokens: three prompts are encoded once instead of twice
        shared_prompt_tokens = sum(len(TOK(p)["input_ids"]) for p in prompts if p == p.rstrip())
        assert n_both == n_alone - shared_prompt_tokens


def test_the_cached_path_is_the_one_used():
    # The concat path is only a fallback: the cropped-cache path must work for a Llama.
    from distill.evaluation.loglik import _choice_logprobs_cached, _choice_logprobs_concat, shared_cache

    model = tiny_llama(len(TOK), seed=1)
    prompts = [TOK("short")["input_ids"], TOK("a rather longer prompt")["input_ids"]]
    choices = [[[5, 6], [7]], [[8, 9, 10]]]
    cache = shared_cache(model)
    assert cache is not None and not any(cache.is_sliding)  # full attention: the right-padded, maskless prompt pass
    with torch.inference_mode():
        cached = _choice_logprobs_cached(model, prompts, choices, PAD, cache)
        concat = _choice_logprobs_concat(model, prompts, choices, PAD)
    for a, b in zip(cached, concat):
        torch.testing.assert_close(torch.cat(a), torch.cat(b), rtol=0, atol=1e-5)


def test_batches_bound_padding():
    from distill.evaluation.batching import length_sorted_batches

    lengths = [100, 12, 10, 11, 10, 50, 10, 10]
    batches = length_sorted_batches(lengths, batch_size=3, max_padding=0.1)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches[0] == [0] and batches[1] == [5]  # the long ones run alone rather than pad the rest
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 1.1 * sum(lengths[i] for i in b)
    assert len(length_sorted_batches(lengths, batch_size=8, max_padding=100.0)) == 1


@torch.no_grad()
def test_competition_one_token_choice_is_log_p_eos_after_the_choice():
    model = tiny_llama(len(TOK), seed=2)
    prompt = "Is the sky blue? Answer:"
    (got,), _ = score_choices(model, TOK, [prompt], [("N", "Y")], "competition")
    for choice, score in zip("NY", got):
        ids = TOK(prompt)["input_ids"] + TOK(choice, add_special_tokens=False)["input_ids"]
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[EOS].item()
        assert score == pytest.approx(logp, abs=1e-5)
    (standard,), _ = score_choices(model, TOK, [prompt], [("N", "Y")], "standard")
    # standard: log P(" " + choice | prompt), the choice as it reads after the prompt.
    for choice, score in zip("NY", standard):
        ids = TOK(prompt + " " + choice)["input_ids"]
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert score == pytest.approx(logp[-3, ids[-2]].item() + logp[-2, ids[-1]].item(), abs=1e-5)
    assert standard != pytest.approx(got, abs=1e-3)  # the two protocols measure different things


def test_unknown_protocol():
    with pytest.raises(DistillError, match="protocol"):
        score_choices(tiny_llama(len(TOK)), TOK, ["a"], [("b", "c")], "fancy")


# ------------------------------------------------------------ generation


def eos_biased_model():
    """A model whose greedy continuations end at EOS for some prompts and not others."""
    prompts = ["1+2=", "hello there", "abc", "The quick brown fox jumps", "7*6=", "zz"]
    for bias in (0.5, 0.75, 1.0, 1.25, 1.5):
        model = tiny_llama(len(TOK), seed=3, eos_bias=bias)
        results = [reference_greedy(model, TOK, p, 8) for p in prompts]
        if any(ended and text for text, ended in results) and not all(ended for _, ended in results):
            return model, prompts
    pytest.fail("no EOS bias gave a mix of continuations that end early and that run to max_new_tokens")


def test_generation_batched_equals_unbatched_greedy():
    model, prompts = eos_biased_model()
    for stop in ((), ("e", "3")):
        expected = [reference_greedy(model, TOK, p, 8, stop)[0] for p in prompts]
        for batch_size in (6, 4, 1):
            texts, n_tokens = generate(model, TOK, prompts, 8, stop, batch_size, max_padding=ANY_PADDING)
            assert texts == expected, (stop, batch_size)
            assert n_tokens > sum(len(p) for p in prompts)


def test_generation_without_bos_in_the_tokenizer():
    tok = char_tokenizer(bos=False)
    model = tiny_llama(len(tok), seed=4)
    texts, _ = generate(model, tok, ["abc", "de"], 5, add_bos="never")
    assert texts == [reference_greedy(model, tok, p, 5)[0] for p in ["abc", "de"]]
    always, _ = generate(model, tok, ["abc"], 5, add_bos="always")
    assert always == [reference_greedy(model, TOK, "abc", 5)[0]]  # TOK adds the BOS itself


# ------------------------------------------------------------ evaluate_models end to end


def test_evaluate_models_writes_predictions_scores_and_table(tmp_path):
    model_a, prompts = eos_biased_model()
    greedy = [reference_greedy(model_a, TOK, p, 6, ("\n",))[0] for p in prompts]
    # Even rows: the model's own greedy output (padded with spaces, stripped by the scorer); odd rows: wrong.
    rows = [{"prompt": p, "target": f" {g} " if i % 2 == 0 else g + "#"}
            for i, (p, g) in enumerate(zip(prompts, greedy))]
    (tmp_path / "skill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "skill.yaml").write_text(
        "kind: generate_exact\ndataset: skill.jsonl\nmax_new_tokens: 6\nstop: ['\\n']\n")
    tasks = [str(tmp_path / "skill.yaml"), "boolq", "mawps"]
    cfg = EvalConfig(tasks=tasks, limit=4, batch_size=3, protocol="standard")
    entries = [ModelEntry("expert-a", lambda: (model_a, TOK)),
               ModelEntry("student", lambda: (tiny_llama(len(TOK), seed=5), TOK))]
    out = tmp_path / "eval"
    scores = evaluate_models(entries, tasks, cfg, out, device="cpu", log=lambda _: None)

    assert list(scores) == ["expert-a", "student"]
    assert scores["expert-a"]["skill"]["accuracy"] == 0.5  # rows 0 and 2 of the first 4
    for per_task in scores.values():
        assert list(per_task) == ["skill", "boolq", "mawps"]
        for m in per_task.values():
            assert m["n"] == 4 and m["wall_s"] > 0 and m["examples_per_s"] > 0 and m["peak_mem_mb"] > 0
        assert per_task["boolq"]["protocol"] == "standard"
    assert json.loads((out / "scores.json").read_text()) == scores
    table = (out / "scores.md").read_text().splitlines()
    assert "| model | skill | boolq | mawps |" in table
    assert any(line.startswith("| expert-a | 50.00 |") for line in table)
    preds = [json.loads(line) for line in (out / "expert-a" / "skill.predictions.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds] == [True, False, True, False]
    assert [p["prediction"] for p in preds] == [g.strip() for g in greedy[:4]]
    boolq = [json.loads(line) for line in (out / "student" / "boolq.predictions.jsonl").read_text().splitlines()]
    assert len(boolq) == 4 and all(len(p["scores"]) == 2 and p["prediction"] in p["choices"] for p in boolq)
    mawps = [json.loads(line) for line in (out / "student" / "mawps.predictions.jsonl").read_text().splitlines()]
    assert len(mawps) == 4 and all("generated" in p for p in mawps)


def test_unreadable_model_path_is_a_one_line_error(tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(str(tmp_path / "missing-model")), TOK

    with pytest.raises(DistillError) as info:
        evaluate_models([ModelEntry("broken", load)], ["mawps"], EvalConfig(limit=1), tmp_path, log=lambda _: None)
    assert "broken" in str(info.value) and "\n" not in str(info.value)


def test_bad_task_fails_before_any_model_is_loaded(tmp_path):
    loaded = []
    entry = ModelEntry("m", lambda: loaded.append(1) or (tiny_llama(len(TOK)), TOK))
    with pytest.raises(DistillError, match="unknown task"):
        evaluate_models([entry], ["mawps", "nope"], EvalConfig(), tmp_path)
    with pytest.raises(DistillError, match="not unique"):
        evaluate_models([entry, entry], ["mawps"], EvalConfig(), tmp_path)
    assert loaded == []


# ------------------------------------------------------------ lm-evaluation-harness bridge


def test_harness_bridge_runs_a_local_task_offline(tmp_path):
    pytest.importorskip("lm_eval")
    from distill.evaluation import run_harness

    model = tiny_llama(len(TOK), seed=6)
    results = run_harness(ModelEntry("tiny", lambda: (model, TOK)), ["boolq_local"], tmp_path, limit=4, batch_size=2,
                          device="cpu")
    assert 0.0 <= results["boolq_local"]["acc,none"] <= 1.0
    saved = json.loads((tmp_path / "tiny" / "harness.json").read_text())
    assert saved["results"]["boolq_local"]["acc,none"] == results["boolq_local"]["acc,none"]


def test_peft_expert_base_plus_adapter():
    # An expert is often a base model plus a LoRA adapter (a PeftModel): scoring and generation go through it.
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(TOK), seed=7)
    torch.manual_seed(0)
    expert = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts, choices = ["Is it? ", "A longer question here?"], [("No", "Yes"), ("False", "True")]
    got, _ = score_choices(expert, TOK, prompts, choices, "competition", batch_size=2)
    expected = [[reference_choice_score(expert, TOK, p, c, "competition") for c in cs]
                for p, cs in zip(prompts, choices)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-4)
    with expert.disable_adapter():  # the adapter must actually change the scores
        plain, _ = score_choices(expert, TOK, prompts, choices, "competition", batch_size=2)
    assert not torch.allclose(torch.tensor(plain), torch.tensor(got), atol=1e-4)
    texts, _ = generate(expert, TOK, prompts, 4, batch_size=2)
    assert texts == [reference_greedy(expert, TOK, p, 4)[0] for p in prompts]
