"""Tokenize prompts, cut them into length-sorted batches, and pad them.

We build input ids and padding ourselves instead of relying on the tokenizer's
`padding_side`, so the layout is the same for every tokenizer. Generation
left-pads (every row continues from the last column); choice scoring
right-pads (see loglik.py for why); continuations are right-padded.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from distill.errors import DistillError


def model_device(model) -> torch.device:
    """Where the model's (first) weights are; works through PEFT wrappers too."""
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    """The id used for padding. Padded positions are masked, so any id works;
    the starter kit used EOS when the tokenizer had no pad token."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_prompts(tokenizer, texts: Sequence[str], add_bos: str = "auto",
                   max_tokens: Optional[int] = None) -> list[list[int]]:
    """Token ids of each prompt.

    add_bos: "auto" keeps the tokenizer's own special tokens (what the starter
    kit did: BOS for Llama/Mistral tokenizers); "always" puts exactly one BOS
    first; "never" adds none. max_tokens keeps the first N tokens, as the
    starter kit's right-side truncation to max_seq_len did.
    """
    texts = list(texts)
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=(add_bos == "auto"))["input_ids"]
    if add_bos == "always":
        bos = tokenizer.bos_token_id
        if bos is None:
            raise DistillError("add_bos: always, but the tokenizer has no BOS token")
        ids = [[bos] + list(x) for x in ids]
    if max_tokens is not None:
        ids = [list(x[:max_tokens]) for x in ids]
    for i, x in enumerate(ids):
        if not x:
            raise DistillError(f"prompt {i} has no tokens (an empty prompt with add_bos: {add_bos}); "
                               "give it text or use add_bos: always")
    return [list(x) for x in ids]


def padding_budget(device) -> float:
    """How much padding a batch may carry, as a fraction of its real tokens.

    On CPU every padded position costs as much as a real one and a bigger batch
    buys little, so batches stay nearly pad-free (10%); on GPU a bigger batch is
    worth more than the padding it brings (50%).
    """
    return 0.1 if torch.device(device).type == "cpu" else 0.5


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_padding: float = 0.5) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    A batch takes at most `batch_size` items, and closes early when padding every
    item to the longest would add more than `max_padding` x its real tokens (so a
    long tail of lengths gets small batches instead of padding everything to it).
    The longest batch comes first, so an out-of-memory failure happens at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current and (len(current) == batch_size
                        or lengths[current[0]] * (len(current) + 1) > (1 + max_padding) * (real + lengths[i])):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape [B, max_len], real tokens flush right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape [B, max_len], real tokens flush left."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded row gets the
    same positions as the unpadded sequence (pads get 0; they are masked)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
