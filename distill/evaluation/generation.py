"""Batched greedy generation with the KV cache, for the generative task kinds.

Prompts are left-padded so every row continues from the last column; position
ids come from the attention mask (transformers' `generate` does this), so a
padded row generates exactly what it would alone. A row stops at EOS; with
stop strings, also as soon as its text contains one. The prediction is the
continuation cut at EOS, decoded without special tokens, cut at the first stop
string (the scorer strips it).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from distill.evaluation.batching import encode_prompts, left_pad, length_sorted_batches, model_device, pad_id

GENERATION_PADDING = 1.0  # a batch's prompt padding may equal its real prompt tokens


class _StopStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, list(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut(tokenizer, new_ids: Sequence[int], eos: Optional[int], stops: Sequence[str]) -> str:
    """Decoded continuation, cut at the first EOS and then at the first stop string."""
    new_ids = list(new_ids)
    if eos is not None and eos in new_ids:
        new_ids = new_ids[:new_ids.index(eos)]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    for s in stops:
        if s in text:
            text = text[:text.index(s)]
    return text


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
             batch_size: int = 16, add_bos: str = "auto", max_prompt_tokens=None,
             max_padding: float | None = None,
             on_batch: Callable[[int], None] | None = None) -> tuple[list[str], int]:
    """Greedy continuations of `prompts`. Returns (texts, tokens processed).

    max_padding: see batching.length_sorted_batches; default by device (padding_budget).
    on_batch: called with a batch's number of prompts once it is generated (a progress bar).
    """
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts, add_bos, max_prompt_tokens)
    # A fresh config: the model's own generation_config may sample or set other stop ids.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
    texts: list[str] = [""] * len(prompts)
    n_tokens = 0
    # Decoding dominates generation's cost and one step of a batch costs far less than a step
    # per row, while prompt padding is paid once, in the prefill: allow generous padding.
    budget = GENERATION_PADDING if max_padding is None else max_padding
    for batch in length_sorted_batches([len(p) for p in prompt_ids], batch_size, budget):
        ids, mask = left_pad([prompt_ids[i] for i in batch], pad, model_device(model))
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, ids.shape[1])] if stop else [])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=criteria)
        new = out[:, ids.shape[1]:].tolist()
        for row, i in enumerate(batch):
            texts[i] = cut(tokenizer, new[row], eos, stop)
            n_new = new[row].index(eos) + 1 if eos is not None and eos in new[row] else len(new[row])
            n_tokens += len(prompt_ids[i]) + n_new
        if on_batch is not None:
            on_batch(len(batch))
    return texts, n_tokens
