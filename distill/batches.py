"""Training batches read from the memory-mapped cache, in a deterministic, resumable order.

The order of samples is a pure function of (seed, epoch): a seeded permutation cut
into global batches of `batch_size * world_size` samples; rank r takes its slice of
each global batch. So a resumed run only needs the number of micro-batches already
consumed, and every rank can count the global number of target tokens of an
optimizer step without communicating (that count normalises the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.cache.store import CacheReader


@dataclass
class Plan:
    """Micro-batches of one epoch: `global_batches[i]` lists sample indices of all ranks."""

    global_batches: list[list[int]]
    world: int

    def local(self, i: int, rank: int) -> list[int]:
        b = self.global_batches[i]
        per = len(b) // self.world
        return b[rank * per:(rank + 1) * per]


def epoch_plan(n_samples: int, batch_size: int, world: int, seed: int, epoch: int) -> Plan:
    """Seeded permutation cut into full global batches (the ragged tail is dropped)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_samples, generator=g).tolist()
    size = batch_size * world
    batches = [perm[i:i + size] for i in range(0, n_samples - size + 1, size)]
    return Plan(batches, world)


class CacheDataset(torch.utils.data.Dataset):
    """Item i = sample i of the cache: tokens, target mask, domain, teacher records (still encoded)."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.target_counts = None

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        return self.reader.sample(i)

    def targets(self) -> np.ndarray:
        """Number of target tokens (teacher rows) per sample; cached after the first call."""
        if self.target_counts is None:
            self.target_counts = self.reader.row_counts()
        return self.target_counts


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad tokens; concatenate teacher records in (sample, position) order.

    Returns input_ids/attention_mask [B, T], select [B, T-1] (True where position t
    predicts a target token t+1), targets [M], records [N, M, R] uint8, row_sample [M]
    (which sample of the batch each row belongs to), domains [B].
    """
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    tmask = torch.zeros((B, T), dtype=torch.bool)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = torch.from_numpy(it["input_ids"])
        attn[r, :n] = 1
        tmask[r, :n] = torch.from_numpy(it["target_mask"])
    select = tmask[:, 1:]
    records = torch.from_numpy(np.concatenate([it["records"] for it in items], axis=1))
    rows = [int(it["records"].shape[1]) for it in items]
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "select": select,
        "targets": ids[:, 1:][select],
        "records": records,
        "row_sample": torch.repeat_interleave(torch.arange(B), torch.tensor(rows)),
        "domains": torch.tensor([it["domain"] for it in items], dtype=torch.long),
    }


class PlanCache:
    """Epoch plans computed once each; `batch(m)` is global micro-batch m across epochs."""

    def __init__(self, n_samples: int, batch_size: int, world: int, seed: int, micro_per_epoch: int):
        self.args = (n_samples, batch_size, world, seed)
        self.micro_per_epoch = micro_per_epoch
        self._plans: dict[int, Plan] = {}

    def get(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            # Keep this epoch and the one before: an optimizer step may straddle the boundary.
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = epoch_plan(*self.args, epoch)
        return self._plans[epoch]

    def batch(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.micro_per_epoch)
        return self.get(epoch).global_batches[pos]
