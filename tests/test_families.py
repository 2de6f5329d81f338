"""The family matrix: every model family users bring, as teacher and as student, against the model itself.

For each family of tests/families.py (tiny random-init Llama, Mistral, Qwen2, Gemma 2, Gemma 3, Phi-3
and Cohere, with their sliding windows, softcap and logit scale switched on):

    cache     the cached top-k log-probs and residual equal log_softmax(model(...).logits)
    lora      a LoRA teacher over it is cached like its merged copy
    loss      the chunked loss (the trainer's StudentWithLoss) gives the loss, CE, divergences and
              parameter gradients of a dense loss computed from model(...).logits
    scoring   choice scores (both protocols, batched, mixed prompt lengths, most longer than the
              sliding window) equal one unbatched full forward of prompt + choice
    e2e       cache -> train (fp32, and bf16 autocast on CPU) -> eval -> from_pretrained (slow)

One calibration file and one cache per family (fp16 codec, top_k 8) serve every test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES, LOGIT_SCALE, SOFTCAP, WINDOW, build, lora_adapter, merged, model_class, save
from loss_reference import dense_loss_from_logits, sparse_signal

from conftest import tiny_recipe, write_recipe
from distill.config import LossConfig, load_recipe

# Embedding rows, padded past the tokenizer as real models pad theirs: loaded beside a Qwen2 config,
# the char tokenizer becomes a Qwen2Tokenizer, which adds an <|endoftext|> token (43 tokens).
VOCAB = 48
K = 8  # cached top-k (of a 42-token vocabulary: the residual bin matters)
PROTOCOLS = ("competition", "standard")


def _rows() -> list[dict]:
    """Calibration rows of 7 to 26 tokens (BOS included): every one longer than the window."""
    add = [{"prompt": f"{a}+{b}=", "response": str(a + b), "domain": "add"}
           for a, b in ((12, 34), (5, 77), (103, 9), (48, 1260), (7, 8), (321, 654))]
    words = ("abcdefg", "hello", "zyxwvutsrq", "kite", "mnopqrs", "quiz")
    rev = [{"prompt": f"rev:{w}=", "response": w[::-1], "domain": "rev"} for w in words]
    return [r for pair in zip(add, rev) for r in pair]


@pytest.fixture(scope="session")
def fam_world(tmp_path_factory) -> dict:
    """The char tokenizer, one calibration file, and two tiny eval tasks (generation, multiple choice)."""
    from experiments.synthetic.toy import build_tokenizer

    root = tmp_path_factory.mktemp("families")
    rows = _rows()
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = [{"prompt": r["prompt"], "target": r["response"]} for r in rows[:4]]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (root / "gen.yaml").write_text("kind: generate_exact\ndataset: gen.jsonl\nmax_new_tokens: 6\n")
    mc = [{"question": q, "label": i % 2} for i, q in enumerate(("isitso", "rev:abc=cba", "1+1=3", "q"))]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (root / "mc.yaml").write_text("kind: multiple_choice\ndataset: mc.jsonl\nchoices: ['no', 'yes']\n"
                                  "templates: [{jinja: '{{ question }}:answer: ||| {{ answer_choices[label] }}'}]\n")
    return {"root": root, "tok": build_tokenizer(), "data": root / "calib.jsonl",
            "tasks": [str(root / "gen.yaml"), str(root / "mc.yaml")]}


@pytest.fixture(scope="session", params=FAMILIES)
def fam(request, fam_world) -> dict:
    """One family's saved teacher (seed 1), student (seed 0) and a LoRA adapter over the teacher."""
    name, tok = request.param, fam_world["tok"]
    root = fam_world["root"] / name
    teacher = save(build(name, VOCAB, seed=1), tok, root / "teacher")
    student = save(build(name, VOCAB, seed=0), tok, root / "student")
    return {**fam_world, "family": name, "root": root, "teacher": teacher, "student": student,
            "adapter": lora_adapter(teacher, root / "adapter", seed=2)}


def _recipe(fam: dict, run_dir: Path, overrides=()):
    """conftest's tiny recipe over this family: teachers `plain` and `lora` (the adapter over it), its student."""
    world = {"ta": fam["teacher"], "tb": fam["teacher"], "base": fam["student"], "data": fam["data"]}
    teachers = [{"name": "plain", "model": str(fam["teacher"])},
                {"name": "lora", "model": str(fam["teacher"]), "adapter": str(fam["adapter"])}]
    recipe = tiny_recipe(world, run_dir, teachers=teachers)
    recipe["cache"] = {"top_k": K, "codec": "fp16", "batch_size": 4, "shard_tokens": 100,
                       "dir": str(fam["root"] / "cache")}
    return load_recipe(write_recipe(run_dir.with_suffix(".yaml"), recipe), list(overrides))


@pytest.fixture(scope="session")
def cached(fam):
    """The family's cache, made by the `distill cache` stage: teachers `plain` and `lora`."""
    from distill import stages
    from distill.cache.store import CacheReader

    recipe = _recipe(fam, fam["root"] / "capture")
    stages.cache(recipe, log=lambda *_: None)
    return {"recipe": recipe, "reader": CacheReader(recipe.cache.dir, verify="full")}


# ---------------------------------------------------------------- the models are what they claim

# What makes each family different, as its saved config must say (a typo'd knob would be dropped silently).
KNOBS = {"mistral": {"sliding_window": WINDOW},
         "qwen2": {"sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"]},
         "gemma2": {"final_logit_softcapping": SOFTCAP, "sliding_window": WINDOW,
                    "layer_types": ["sliding_attention", "full_attention"]},
         "gemma3": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
         "cohere": {"logit_scale": LOGIT_SCALE}}


def test_each_family_is_built_as_described(fam):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(fam["student"])
    tok = fam["tok"]
    assert cfg.architectures == [model_class(fam["family"]).__name__]
    from distill.models import load_tokenizer

    assert cfg.hidden_size <= 64 and cfg.num_hidden_layers == 2 and cfg.vocab_size == VOCAB
    assert len(tok) <= len(load_tokenizer(str(fam["student"]))) <= VOCAB
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id,
                                                                        tok.eos_token_id)
    for key, value in KNOBS.get(fam["family"], {}).items():
        assert getattr(cfg, key) == value, key


# ---------------------------------------------------------------- the cache holds the model's own log-probs


def _close(got, want, what: str, **tolerance) -> None:
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **tolerance)


def _assert_cache_is_model(reader, teacher: int, model) -> None:
    """Per target row: the cached ids are the model's top-K, with its log-probs and residual (fp16)."""
    codec = reader.codec()
    assert len(reader) == len(_rows())
    for i in range(len(reader)):
        s = reader.sample(i)
        pos = np.flatnonzero(s["target_mask"]) - 1  # position t predicts token t+1
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(s["input_ids"]).long()[None]).logits[0, pos].float(), -1)
        ids, got_lp, got_res = codec.decode(torch.from_numpy(s["records"][teacher]))
        where = f"teacher {reader.teacher_names[teacher]}, sample {i}"
        # Log-probs of the ids the cache holds, within fp16 rounding (|error| <= 2^-11 |x|) ...
        _close(got_lp, lp.gather(-1, ids.long()), f"{where}, log-probs of the cached ids", atol=1e-3, rtol=1e-3)
        # ... and those are the K largest (compared as values: robust to near-ties among ids).
        _close(got_lp.sort(-1, descending=True).values, lp.topk(K, -1).values, f"{where}, top-{K} values",
               atol=1e-3, rtol=1e-3)
        rest = lp.scatter(-1, ids.long(), -math.inf).logsumexp(-1)
        _close(got_res, rest, f"{where}, residual", atol=1e-3, rtol=1e-3)


def test_cache_holds_the_models_own_logprobs(fam, cached):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(fam["teacher"]).eval()
    assert isinstance(teacher, model_class(fam["family"]))
    _assert_cache_is_model(cached["reader"], 0, teacher)


def test_lora_teacher_caches_like_its_merged_copy(fam, cached):
    from transformers import AutoModelForCausalLM

    reference = merged(fam["teacher"], fam["adapter"])
    _assert_cache_is_model(cached["reader"], 1, reference)
    # The adapter acts: the merged copy is not the base (so teacher 1 is not teacher 0 by accident).
    ids = torch.tensor([[1, 5, 9, 14, 7, 20, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(fam["teacher"]).eval()
        assert (reference(ids).logits - base(ids).logits).abs().max() > 0.1


# ---------------------------------------------------------------- the chunked loss is the model's own loss


def _loss_batch(vocab: int):
    """3 rows of 14 tokens, the last right-padded after 10; targets from position 4 on; 2 teachers."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    ids[2, 10:] = 0
    select = torch.zeros(3, 13, dtype=torch.bool)  # predicting token t+1 from position t
    select[:, 4:] = True
    select[2, 9:] = False
    m = int(select.sum())
    from distill.loss import TeacherSignal

    signal = TeacherSignal(*sparse_signal(3 * torch.randn(2, m, vocab, generator=g), K))
    token_weights = torch.tensor([[1.0], [0.5]]).expand(2, m).contiguous()
    return ids, mask, select, ids[:, 1:][select], signal, token_weights


def _grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_chunked_loss_equals_dense_loss_from_model_logits(fam):
    from transformers import AutoModelForCausalLM

    from distill.train import StudentWithLoss

    student = AutoModelForCausalLM.from_pretrained(fam["student"])
    student.train()  # as the trainer runs it (the families' dropouts are 0)
    ids, mask, select, targets, signal, tw = _loss_batch(student.config.vocab_size)
    cfg = LossConfig(divergence="forward_kl", temperature=1.5, ce_weight=0.2, chunk_size=7)

    got = StudentWithLoss(student, cfg)(ids, mask, select, targets, signal, tw)
    got["loss_sum"].backward()
    got_g = _grads(student)

    logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][select]
    loss, n_tokens, divs, shares, ce = dense_loss_from_logits(logits, signal.ids, signal.logprobs, signal.log_residual,
                                                              targets, tw, cfg)
    loss.backward()
    ref_g = _grads(student)

    assert got["n_tokens"] == n_tokens == 23
    _close(got["ce"], ce, "CE (the student's log-probs of the gold)", rtol=1e-5, atol=1e-5)
    _close(got["div"], divs, "per-teacher divergences", rtol=1e-5, atol=1e-5)
    _close(got["share"], shares, "teacher shares", rtol=1e-6, atol=1e-6)
    _close(got["loss_sum"].detach(), loss.detach(), "loss", rtol=1e-5, atol=1e-5)
    assert set(got_g) == set(ref_g) == {n for n, p in student.named_parameters() if p.requires_grad}
    for name, g in ref_g.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        _close(got_g[name], g, f"gradient of {name}", rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- choice scoring is the full forward

# Prompts of 3 to 32 tokens (BOS included): all but the first are longer than the window; ragged choices.
PROMPTS = ["ab", "isitso:", "rev:abcdefgh=hgfedcba:answer:", "12+34=46:", "q:isthesky=blue:passage:abcdef:"]
CHOICES = [("no", "yes"), ("false", "true"), ("no", "yes"), ("a", "bcd", "efghij"), ("no", "yes")]


@torch.no_grad()
def _full_forward_score(model, tok, prompt: str, choice: str, protocol: str) -> float:
    """One unpadded forward over prompt + choice, the protocol's sum written out plainly.
    standard scores the choice in context after the documented text rule (`split_context`: a
    space between "answer:" and "yes"); with a char tokenizer the continuation's tokens are the
    same alone and after the prompt."""
    from distill.evaluation.loglik import split_context

    if protocol == "standard":
        prompt, choice = split_context(prompt, choice)
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    if protocol == "competition":
        c, counted = c + [tok.eos_token_id], range(1, len(c) + 1)  # EOS appended, the first token skipped
    else:
        counted = range(len(c))
    logp = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(logp[len(p) + t - 1, c[t]].item() for t in counted)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_choice_scores_equal_the_unbatched_full_forward(fam, protocol):
    from transformers import AutoModelForCausalLM

    from distill.evaluation.loglik import score_choices

    model = AutoModelForCausalLM.from_pretrained(fam["student"]).eval()
    tok = fam["tok"]
    assert sum(len(tok(p)["input_ids"]) > WINDOW for p in PROMPTS) == len(PROMPTS) - 1
    expected = [[_full_forward_score(model, tok, p, c, protocol) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    flat = torch.tensor([s for row in expected for s in row])
    for batch_size, reuse_cache in ((len(PROMPTS), True), (3, True), (len(PROMPTS), False)):
        # max_padding: let prompts of mixed lengths share a batch (CPU's default keeps batches pad-free)
        got, _ = score_choices(model, tok, PROMPTS, CHOICES, protocol, batch_size, reuse_cache=reuse_cache,
                               max_padding=100.0)
        _close(torch.tensor([s for row in got for s in row]), flat,
               f"batch_size {batch_size}, reuse_cache {reuse_cache}", rtol=0, atol=1e-4)


# ---------------------------------------------------------------- cache -> train -> eval -> reload

STEPS = 4


def _train_in_fresh_accelerate_state(recipe):
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision; a `distill train` process makes one. Reset it before and after."""
    from accelerate.state import AcceleratorState

    from distill import stages

    AcceleratorState._reset_state()
    try:
        return stages.train(recipe, log=lambda *_: None)
    finally:
        AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def trained(fam, cached):
    """run(precision) -> (recipe, TrainResult, losses per step), each precision trained once."""
    runs: dict = {}

    def run(precision: str):
        if precision not in runs:
            # The whole calibration set in every step: the loss falls step after step.
            mixed = {"fp32": "'no'", "bf16": "bf16"}[precision]  # quoted: a bare no is YAML's false
            recipe = _recipe(fam, fam["root"] / f"run-{precision}", [
                f"train.mixed_precision={mixed}", f"train.max_steps={STEPS}",
                f"train.batch_size={len(_rows())}", "train.lr=3e-3", "train.schedule=constant",
                "eval.batch_size=4", f"eval.tasks={json.dumps(fam['tasks'])}"])
            result = _train_in_fresh_accelerate_state(recipe)
            log = Path(recipe.run_dir, "train_log.jsonl").read_text().splitlines()
            runs[precision] = recipe, result, [json.loads(x)["loss"] for x in log]
        return runs[precision]
    return run


def _reload_and_check(recipe, result, fam) -> None:
    """The saved student loads with from_pretrained, is the family's class, and is no longer the initial one."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(result.student_dir).eval()
    initial = AutoModelForCausalLM.from_pretrained(fam["student"]).eval()
    assert isinstance(student, model_class(fam["family"])) and student.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 14, 7, 20, 3, 30, 11]])
    with torch.no_grad():
        after, before = student(ids).logits, initial(ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3


@pytest.mark.slow
def test_cache_train_eval_reload(fam, trained):
    from distill import stages

    recipe, result, losses = trained("fp32")
    assert result.steps == STEPS and result.stopped_by == "done" and len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    _reload_and_check(recipe, result, fam)
    scores = stages.evaluate(recipe, log=lambda *_: None)
    assert set(scores) == {"plain", "lora", "student"}
    for model, tasks in scores.items():
        assert set(tasks) == {"gen", "mc"} and all(t["n"] == 4 for t in tasks.values()), (model, tasks)
    assert Path(recipe.run_dir, "eval", "scores.json").exists()


@pytest.mark.slow
def test_bf16_autocast_training_tracks_fp32(fam, trained):
    _, _, fp32 = trained("fp32")
    recipe, result, bf16 = trained("bf16")
    assert result.steps == STEPS and all(math.isfinite(x) for x in bf16) and bf16[-1] < bf16[0], bf16
    # Autocast really ran in bf16 (the losses differ), and bf16 rounding (~2^-8) moved them by < 2%.
    assert bf16 != fp32
    for step, (a, b) in enumerate(zip(bf16, fp32)):
        assert abs(a - b) <= 0.02 * abs(b), (step, bf16, fp32)
    _reload_and_check(recipe, result, fam)
