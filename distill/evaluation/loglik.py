"""Answer-choice log-likelihoods, batched, with the prompt's KV cache shared by its choices.

Two protocols (docs/eval.md):

- `competition`, the LLM-Merging starter kit's decoder scoring: each choice is
  tokenized alone, without BOS, with EOS appended, and scored by the sum of
  log-probs of its tokens after the first. For a one-token choice ("Yes") that
  is log P(EOS | prompt + "Yes"): how willing the model is to stop after the
  answer, not the probability of the answer itself. Reproduced because the
  competition's numbers were computed this way.
- `standard`: log P(continuation | prompt), the continuation being the choice
  as it reads after the prompt (" Yes" after "Answer:"), tokenized in context
  (see `continuation_ids`).

Per batch: one pass of the model's decoder over the prompts keeps their keys
and values; then each choice slot (all first choices, then all second choices,
...) runs as a short right-padded pass on top of that cache, which is cropped
back to the prompts afterwards. The prompt is encoded once however many choices
it has, and the cache is never duplicated per choice. Where the cache cannot be
rolled back exactly (decided up front from its layers, `shared_cache`), every
choice runs as one full prompt+choice sequence instead.

The scored log-probs are always a log_softmax over fp32 logits computed in fp32
from the final hidden states (`distill.logits.model_logits(..., fp32=True)`), whatever the model's dtype.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from distill.errors import DistillError
from distill.evaluation.batching import (encode_prompts, left_pad, length_sorted_batches, model_device,
                                         pad_id, padding_budget, positions, right_pad)
from distill.logits import decoder, logit_transform, model_logits

PROTOCOLS = ("competition", "standard")
# What separates a `standard` choice from its prompt: lm-evaluation-harness's default
# `target_delimiter`, the space before a word in running text ("Answer: Yes").
DELIMITER = " "


def counted(n_tokens: int, protocol: str) -> range:
    """Which of a choice's tokens are summed: competition skips the first."""
    return range(1, n_tokens) if protocol == "competition" else range(n_tokens)


def _plain(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def competition_choice_ids(tokenizer, choice: str) -> list[int]:
    """The starter kit's choice tokens: the choice alone, without special tokens, EOS appended."""
    if tokenizer.eos_token_id is None:
        raise DistillError("protocol competition appends EOS to each choice, but the tokenizer has no EOS token")
    return _plain(tokenizer, [choice])[0] + [int(tokenizer.eos_token_id)]


def split_context(prompt: str, choice: str) -> tuple[str, str]:
    """(context, continuation) texts of a `standard` choice; context + continuation is the scored text.

    The prompt's trailing whitespace moves to the continuation (lm-evaluation-harness's rule:
    BPE tokenizers glue a space to the word after it, " Yes"); when no whitespace separates
    prompt and choice, DELIMITER does.
    """
    context = prompt.rstrip()
    gap = prompt[len(context):]
    if not gap and choice and not choice[0].isspace():
        gap = DELIMITER
    return context, gap + choice


def continuation_ids(tokenizer, contexts: list[str], continuations: list[str]) -> list[list[int]]:
    """Per pair, the continuation's tokens as the tokenizer splits context + continuation.

    The tokens of the whole text after the context's own tokens, when those are its prefix
    (the usual case). When a token straddles the boundary (the tokenizer merges the
    context's last characters with the continuation's first), the whole text has no split
    at the context's tokens; then the continuation is tokenized alone, so the scored tokens
    still spell exactly context + continuation (lm-eval would take the whole's tokens after
    the context's count, which can drop or repeat characters).
    """
    ctx = _plain(tokenizer, contexts)
    whole = _plain(tokenizer, [c + k for c, k in zip(contexts, continuations)])
    out = []
    for c, w, k in zip(ctx, whole, continuations):
        out.append(w[len(c):] if w[:len(c)] == c else _plain(tokenizer, [k])[0])
    return out


def encode_choices(tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], protocol: str,
                   add_bos: str = "auto", max_prompt_tokens=None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids per prompt, token ids per choice per prompt) under `protocol`.

    competition: the prompts as given, each choice alone + EOS. standard: the prompts without
    trailing whitespace, each choice's continuation tokens in context (split_context,
    continuation_ids). Prompt special tokens and truncation: batching.encode_prompts.
    """
    if protocol == "competition":
        memo = {c: competition_choice_ids(tokenizer, c) for c in {c for cs in choices for c in cs}}
        return encode_prompts(tokenizer, prompts, add_bos, max_prompt_tokens), [[memo[c] for c in cs] for cs in choices]
    pairs = [split_context(p, c) for p, cs in zip(prompts, choices) for c in cs]
    flat = iter(continuation_ids(tokenizer, [c for c, _ in pairs], [k for _, k in pairs]))
    contexts = [p.rstrip() for p in prompts]
    return encode_prompts(tokenizer, contexts, add_bos, max_prompt_tokens), [[next(flat) for _ in cs] for cs in choices]


def shared_cache(model) -> DynamicCache | None:
    """A fresh cache that the choice passes can share and crop back exactly, or None.

    Full-attention layers crop exactly. Sliding-window (and chunked-attention) layers keep
    only their last window - 1 keys and cannot crop once prompt + choice reaches the
    window, unless they record the past until each crop (`activate_past_recording`), which
    they do here. Any other layer (linear attention, conv states, sparse indexers) gets
    None: the caller scores full prompt+choice sequences instead.
    """
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if not cache.layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return None
    cache.activate_past_recording()
    return cache


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits [B, T, V] fp32) at ids [B, T] -> [B, T]."""
    return logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def _choice_logprobs_cached(model, prompts, choices, pad, cache: DynamicCache) -> list[list[torch.Tensor]]:
    """Per prompt, per choice: the log-prob of each choice token given the prompt and the
    choice's earlier tokens. One pass over the prompts into `cache` (from shared_cache), then
    one pass per choice slot on top of it, cropped back to the prompts after each pass."""
    device, body, transform = model_device(model), decoder(model), logit_transform(model)
    if any(cache.is_sliding):
        # A sliding window is counted in columns (key visible iff query column - key column <
        # window), so each row's real tokens must be contiguous: left-pad the prompts, and the
        # choices continue from the last column.
        ids, mask = left_pad(prompts, pad, device)
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions(mask), cache=cache, use_cache=True)
        last_hidden = out.last_hidden_state[:, -1]
    else:
        # Full attention: right-pad and pass no mask. Under causal attention a real token never
        # sees the pads after it, and positions 0..n-1 are already right, so attention takes
        # its fast causal path (an explicit padding mask makes CPU attention materialise
        # [B, H, T, T]). The pads' keys and values are masked in the choice passes.
        ids, mask = right_pad(prompts, pad, device)
        out = body(input_ids=ids, cache=cache, use_cache=True)
        last_hidden = out.last_hidden_state[torch.arange(len(prompts), device=device), mask.sum(-1) - 1]
    lengths = mask.sum(-1, keepdim=True)
    first = model_logits(model, last_hidden, transform, fp32=True)  # [B, V]: each prompt's last token predicts choice token 0
    result: list[list[torch.Tensor]] = [[] for _ in prompts]
    for slot in range(max(len(cs) for cs in choices)):
        # Prompts with fewer choices get an empty, fully masked row in this slot.
        seqs = [cs[slot] if slot < len(cs) else [] for cs in choices]
        cids, cmask = right_pad(seqs, pad, device)
        hidden = body(input_ids=cids, attention_mask=torch.cat([mask, cmask], dim=1),
                      position_ids=lengths + torch.arange(cids.shape[1], device=device), cache=cache,
                      use_cache=True).last_hidden_state
        cache.crop(-cids.shape[1])  # drop this slot's keys/values: the next choice sees the prompt only
        logits = torch.cat([first[:, None], model_logits(model, hidden[:, :-1], transform, fp32=True)], dim=1)
        lp = _token_logprobs(logits, cids)
        for b, cs in enumerate(choices):
            if slot < len(cs):
                result[b].append(lp[b, :len(cs[slot])])
    return result


def _choice_logprobs_concat(model, prompts, choices, pad) -> list[list[torch.Tensor]]:
    """The same quantity from full prompt+choice sequences, one left-padded row per choice (no
    cache reuse): for caches that cannot be shared, and an independent path for the tests."""
    device = model_device(model)
    owner = [b for b, cs in enumerate(choices) for _ in cs]
    flat = [c for cs in choices for c in cs]
    ids, mask = left_pad([list(prompts[b]) + list(c) for b, c in zip(owner, flat)], pad, device)
    width = max(1, max(len(c) for c in flat))
    hidden = decoder(model)(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                            use_cache=False).last_hidden_state
    # Positions -(width+1)..-2 predict the last `width` tokens, where the choices are right-aligned.
    lp = _token_logprobs(model_logits(model, hidden[:, -(width + 1):-1], fp32=True), ids[:, -width:])
    result: list[list[torch.Tensor]] = [[] for _ in prompts]
    for row, (b, c) in enumerate(zip(owner, flat)):
        result[b].append(lp[row, width - len(c):] if c else lp[row, :0])
    return result


def score_choices(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  protocol: str = "competition", batch_size: int = 16, add_bos: str = "auto",
                  max_prompt_tokens=None, reuse_cache: bool = True,
                  max_padding: float | None = None,
                  on_batch: Callable[[int], None] | None = None) -> tuple[list[list[float]], int]:
    """Score every choice of every prompt. Returns (scores per prompt, tokens processed).

    reuse_cache: share each prompt's KV cache across its choices where the model's cache
    allows it (shared_cache); False always scores full prompt+choice sequences.
    max_padding: see batching.length_sorted_batches; default by device (padding_budget).
    on_batch: called with a batch's number of prompts once it is scored (a progress bar).
    """
    scores, n_tokens = score_choices_protocols(model, tokenizer, prompts, choices, [protocol], batch_size, add_bos,
                                               max_prompt_tokens, reuse_cache, max_padding, on_batch)
    return scores[protocol], n_tokens


@torch.inference_mode()
def score_choices_protocols(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                            protocols: Sequence[str], batch_size: int = 16, add_bos: str = "auto",
                            max_prompt_tokens=None, reuse_cache: bool = True, max_padding: float | None = None,
                            on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, list[list[float]]], int]:
    """score_choices under several protocols at once: ({protocol: scores per prompt}, tokens processed).

    A prompt whose tokens are the same under two protocols (the usual case: `standard` only
    differs for a prompt that ends in whitespace) runs its prompt pass once, with the protocols'
    choices as its choice slots one after the other; a prompt whose tokens differ runs once per
    distinct token sequence. Each choice's log-probs are exactly what a one-protocol call gives.
    on_batch is called with the number of prompts whose first pass is in the batch.
    """
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise DistillError(f"eval.protocol: unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    pad = pad_id(tokenizer)
    logit_transform(model)  # an unknown logit transform fails before any batch runs
    encoded = {p: encode_choices(tokenizer, prompts, choices, p, add_bos, max_prompt_tokens) for p in protocols}
    # Jobs: one per distinct prompt token sequence of each prompt; each job's choices are those of
    # every protocol that encodes the prompt to it, and `where` records which slots are whose.
    job_prompts: list[list[int]] = []
    job_choices: list[list[list[int]]] = []
    first_job: list[bool] = []
    where: dict[str, list[tuple[int, int]]] = {p: [] for p in protocols}  # per prompt: (job, first slot)
    for i in range(len(prompts)):
        mine: dict[tuple[int, ...], int] = {}
        for p in protocols:
            ids, cs = encoded[p][0][i], encoded[p][1][i]
            job = mine.get(tuple(ids))
            if job is None:
                job = mine[tuple(ids)] = len(job_prompts)
                job_prompts.append(ids)
                job_choices.append([])
                first_job.append(len(mine) == 1)
            where[p].append((job, len(job_choices[job])))
            job_choices[job].extend(cs)
    logprobs: list[list[torch.Tensor]] = [[] for _ in job_prompts]
    n_tokens = 0
    budget = padding_budget(model_device(model)) if max_padding is None else max_padding
    reuse_cache = reuse_cache and shared_cache(model) is not None
    for batch in length_sorted_batches([len(p) for p in job_prompts], batch_size, budget):
        batch_prompts, batch_choices = [job_prompts[j] for j in batch], [job_choices[j] for j in batch]
        if any(batch_choices):
            if reuse_cache:
                lp = _choice_logprobs_cached(model, batch_prompts, batch_choices, pad, shared_cache(model))
            else:
                lp = _choice_logprobs_concat(model, batch_prompts, batch_choices, pad)
            for j, per_choice in zip(batch, lp):
                logprobs[j] = per_choice
            n_tokens += sum(len(p) for p in batch_prompts) + sum(len(c) for cs in batch_choices for c in cs)
        if on_batch is not None:
            on_batch(sum(first_job[j] for j in batch))
    results: dict[str, list[list[float]]] = {}
    for p in protocols:
        results[p] = []
        for i, (job, start) in enumerate(where[p]):
            cs = encoded[p][1][i]
            results[p].append([float(logprobs[job][start + c][list(counted(len(tok), p))].sum())
                               for c, tok in enumerate(cs)])
    return results, n_tokens
