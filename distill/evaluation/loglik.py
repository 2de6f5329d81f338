"""Answer-choice log-likelihoods, batched, with the prompt's KV cache shared by its choices.

Two protocols (docs/eval.md):

- `competition`, the LLM-Merging starter kit's decoder scoring: each choice is
  tokenized alone, without BOS, with EOS appended, and scored by the sum of
  log-probs of its tokens after the first. For a one-token choice ("Yes") that
  is log P(EOS | prompt + "Yes"): how willing the model is to stop after the
  answer, not the probability of the answer itself. Reproduced because the
  competition's numbers were computed this way.
- `standard`: the sum of log-probs of every choice token (no EOS), i.e.
  log P(choice | prompt).

Per batch: one forward pass over the prompts keeps their keys and values; then
each choice slot (all first choices, then all second choices, ...) runs as a
short right-padded pass on top of that cache, which is cropped back to the
prompts afterwards. The prompt is encoded once however many choices it
has, and the cache is never duplicated per choice, so memory stays that of one
copy.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from distill.errors import DistillError
from distill.evaluation.batching import (encode_prompts, left_pad, length_sorted_batches, model_device,
                                         pad_id, padding_budget, positions, right_pad)

PROTOCOLS = ("competition", "standard")


def choice_ids(tokenizer, choice: str, protocol: str) -> list[int]:
    """A choice's tokens: alone, without special tokens; competition appends EOS."""
    ids = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
    if protocol == "competition":
        if tokenizer.eos_token_id is None:
            raise DistillError("protocol competition appends EOS to each choice, but the tokenizer has no EOS token")
        ids.append(int(tokenizer.eos_token_id))
    return ids


def counted(n_tokens: int, protocol: str) -> range:
    """Which of a choice's tokens are summed: competition skips the first."""
    return range(1, n_tokens) if protocol == "competition" else range(n_tokens)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _keep(model, which) -> dict:
    """`logits_to_keep` when the model takes it: the full [B, T, V] logits are the biggest
    allocation of a forward pass (B=16, T=500, V=49k: 1.6 GB in fp32), and we need few."""
    params = inspect.signature(_base(model).forward).parameters
    return {"logits_to_keep": which} if "logits_to_keep" in params else {}


def _choice_logprobs_cached(model, prompts, choices, pad) -> list[list[torch.Tensor]] | None:
    """Per prompt, per choice: the log-prob of each choice token given the prompt and the
    choice's earlier tokens. One pass over the prompts, then one pass per choice slot on top
    of their cache, which is cropped back to the prompts after each pass: the prompts are
    encoded once, and the cache is never copied per choice. None when the model's cache
    cannot be cropped (then the caller falls back to full sequences)."""
    device = model_device(model)
    # The prompt pass is right-padded and has no attention mask: with causal attention a
    # real token never sees the pads after it, and positions 0..n-1 are already right, so
    # attention can take its fast causal path (an explicit padding mask makes CPU attention
    # materialise [B, H, T, T]). The pads' keys and values are masked in the choice passes.
    ids, mask = right_pad(prompts, pad, device)
    lengths = mask.sum(-1, keepdim=True)
    last = lengths[:, 0] - 1  # each prompt's last real token predicts its choices' first token
    keep = torch.unique(last)  # logits for these positions only, not [B, T, V]
    kwargs = _keep(model, keep)
    out = model(input_ids=ids, use_cache=True, **kwargs)
    column = torch.searchsorted(keep, last) if kwargs else last
    first = out.logits[torch.arange(len(prompts), device=device), column].float().log_softmax(-1)
    cache = getattr(out, "cache", None)
    if cache is None or not getattr(cache, "is_croppable", False):
        return None
    result: list[list[torch.Tensor]] = [[] for _ in prompts]
    for slot in range(max(len(cs) for cs in choices)):
        # Prompts with fewer choices get an empty, fully masked row in this slot.
        seqs = [cs[slot] if slot < len(cs) else [] for cs in choices]
        cids, cmask = right_pad(seqs, pad, device)
        out = model(input_ids=cids, attention_mask=torch.cat([mask, cmask], dim=1),
                    position_ids=lengths + torch.arange(cids.shape[1], device=device), cache=cache, use_cache=True)
        if not cache.is_croppable:  # e.g. a sliding window that has moved: cannot roll back
            return None
        cache.crop(-cids.shape[1])  # drop this slot's keys/values: the next choice sees the prompt only
        logp = torch.cat([first[:, None], out.logits[:, :-1].float().log_softmax(-1)], dim=1)
        lp = logp.gather(-1, cids[..., None]).squeeze(-1)
        for b, cs in enumerate(choices):
            if slot < len(cs):
                result[b].append(lp[b, :len(cs[slot])])
    return result


def _choice_logprobs_concat(model, prompts, choices, pad) -> list[list[torch.Tensor]]:
    """The same quantity from full prompt+choice sequences, one row per choice (no cache
    reuse): for models whose cache cannot be cropped, and an independent path for the tests."""
    device = model_device(model)
    owner = [b for b, cs in enumerate(choices) for _ in cs]
    flat = [c for cs in choices for c in cs]
    ids, mask = left_pad([list(prompts[b]) + list(c) for b, c in zip(owner, flat)], pad, device)
    width = max(1, max(len(c) for c in flat))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **_keep(model, width + 1))
    logp = out.logits[:, -(width + 1):-1].float().log_softmax(-1)  # predicts the last `width` tokens
    lp = logp.gather(-1, ids[:, -width:, None]).squeeze(-1)  # choice tokens are right-aligned
    result: list[list[torch.Tensor]] = [[] for _ in prompts]
    for row, (b, c) in enumerate(zip(owner, flat)):
        result[b].append(lp[row, width - len(c):] if c else lp[row, :0])
    return result


@torch.inference_mode()
def score_choices(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  protocol: str = "competition", batch_size: int = 16, add_bos: str = "auto",
                  max_prompt_tokens=None, reuse_cache: bool = True,
                  max_padding: float | None = None) -> tuple[list[list[float]], int]:
    """Score every choice of every prompt. Returns (scores per prompt, tokens processed).

    max_padding: see batching.length_sorted_batches; default by device (padding_budget).
    """
    if protocol not in PROTOCOLS:
        raise DistillError(f"eval.protocol: unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    pad = pad_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, add_bos, max_prompt_tokens)
    memo = {c: choice_ids(tokenizer, c, protocol) for c in {c for cs in choices for c in cs}}
    choice_tok = [[memo[c] for c in cs] for cs in choices]
    results: list[list[float]] = [[] for _ in prompts]
    n_tokens = 0
    budget = padding_budget(model_device(model)) if max_padding is None else max_padding
    for batch in length_sorted_batches([len(p) for p in prompt_ids], batch_size, budget):
        batch_prompts, batch_choices = [prompt_ids[i] for i in batch], [choice_tok[i] for i in batch]
        if not any(batch_choices):
            continue
        lp = _choice_logprobs_cached(model, batch_prompts, batch_choices, pad) if reuse_cache else None
        if lp is None:
            reuse_cache = False  # this model's cache cannot be cropped: stop trying
            lp = _choice_logprobs_concat(model, batch_prompts, batch_choices, pad)
        for i, per_choice, cs in zip(batch, lp, batch_choices):
            results[i] = [float(t[list(counted(len(c), protocol))].sum()) for t, c in zip(per_choice, cs)]
        n_tokens += sum(len(p) for p in batch_prompts) + sum(len(c) for cs in batch_choices for c in cs)
    return results, n_tokens
