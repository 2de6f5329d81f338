"""Training batches read from the memory-mapped cache, in a deterministic, resumable order.

The order of samples is a pure function of (seed, epoch): a seeded permutation cut
into global batches of `batch_size * world_size` samples; rank r takes its slice of
each global batch. With length grouping, the permutation is cut into windows of
`group_batches` global batches, each window is sorted by sample length before it is
cut, and the order of the global batches is then shuffled (same seed), so a batch
holds samples of similar length (little padding) while the run still sees the data
in random order. Either way a resumed run only needs the number of micro-batches
already consumed, and every rank can count the global number of target tokens of an
optimizer step without communicating (that count normalises the loss).

Batches reach the loop through a `torch.utils.data.DataLoader`: a batch sampler walks
the plan from the resume position and hands this rank's index lists to the workers,
which read the cache (each worker opens its own memory maps) and collate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from distill.cache.store import CacheReader
from distill.loss import TeacherSignal


@dataclass
class Plan:
    """Micro-batches of one epoch: `global_batches[i]` lists sample indices of all ranks."""

    global_batches: list[list[int]]
    world: int

    def local(self, i: int, rank: int) -> list[int]:
        b = self.global_batches[i]
        per = len(b) // self.world
        return b[rank * per:(rank + 1) * per]


def epoch_plan(n_samples: int, batch_size: int, world: int, seed: int, epoch: int,
               lengths: np.ndarray | None = None, group_batches: int = 50) -> Plan:
    """Seeded permutation cut into full global batches (the ragged tail is dropped).

    With `lengths` (tokens per sample), samples are grouped by length: windows of
    `group_batches` global batches are sorted longest first, cut, and the batches of the
    whole epoch are shuffled. Every global batch still has exactly `batch_size * world`
    samples, so every rank runs the same number of micro-batches of equal size.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_samples, generator=g).numpy()
    size = batch_size * world
    kept = perm[:n_samples // size * size]
    if lengths is None:
        return Plan(kept.reshape(-1, size).tolist(), world)
    window = size * group_batches
    batches: list[list[int]] = []
    for w in range(0, len(kept), window):
        part = kept[w:w + window]
        # Stable sort of a random permutation: ties keep their random order, so still a pure function of the seed.
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += part.reshape(-1, size).tolist()
    order = torch.randperm(len(batches), generator=g).tolist()
    return Plan([batches[i] for i in order], world)


def padding_fraction(plan: Plan, lengths: np.ndarray) -> float:
    """Padded tokens / all tokens of the plan's micro-batches (each rank pads to its own longest sample)."""
    if not plan.global_batches:
        return 0.0
    lens = lengths[np.asarray(plan.global_batches)].reshape(len(plan.global_batches), plan.world, -1)
    total = int(lens.max(axis=-1).sum()) * lens.shape[-1]
    return 1.0 - int(lens.sum()) / max(total, 1)


class CacheDataset(torch.utils.data.Dataset):
    """Item i = sample i of the cache: tokens, target mask, domain, teacher records (still encoded).

    Pickles as the cache path only (a pickled np.memmap would carry a full copy of the
    data), so a worker started by spawn/forkserver opens its own maps; `reopen()` (the
    loader's worker_init_fn) does the same for forked workers.
    """

    def __init__(self, reader: CacheReader):
        self.dir = reader.dir
        self._reader: CacheReader | None = reader
        self.target_counts = None

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.dir, verify="none")  # the parent process checked it
        return self._reader

    def reopen(self) -> None:
        self._reader = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "target_counts": None}

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


def decode_signal(codec, records: torch.Tensor) -> TeacherSignal:
    """records [N, M, R] uint8 -> TeacherSignal with [N, M, k] tensors."""
    N, M, R = records.shape
    ids, lp, res = codec.decode(records.reshape(N * M, R))
    k = ids.shape[-1]
    return TeacherSignal(ids=ids.reshape(N, M, k), logprobs=lp.reshape(N, M, k), log_residual=res.reshape(N, M))


def collate_decoded(items: list[dict], pad_id: int, codec) -> dict:
    """`collate`, with the records already decoded: "signal" = (ids, logprobs, log_residual) instead of "records"."""
    batch = collate(items, pad_id)
    records = batch.pop("records")
    if records.shape[0] == 0:  # every teacher is online: nothing cached to decode
        return batch
    s = decode_signal(codec, records)
    batch["signal"] = (s.ids, s.logprobs, s.log_residual)
    return batch


class PlanCache:
    """Epoch plans computed once each; `batch(m)` is global micro-batch m across epochs."""

    def __init__(self, n_samples: int, batch_size: int, world: int, seed: int, micro_per_epoch: int,
                 lengths: np.ndarray | None = None, group_batches: int = 50):
        self.args = (n_samples, batch_size, world, seed)
        self.grouping = {"lengths": lengths, "group_batches": group_batches}
        self.micro_per_epoch = micro_per_epoch
        self._plans: dict[int, Plan] = {}

    def get(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            # Keep this epoch and the one before: an optimizer step may straddle the boundary.
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = epoch_plan(*self.args, epoch, **self.grouping)
        return self._plans[epoch]

    def batch(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.micro_per_epoch)
        return self.get(epoch).global_batches[pos]

    def local(self, m: int, rank: int) -> list[int]:
        epoch, pos = divmod(m, self.micro_per_epoch)
        return self.get(epoch).local(pos, rank)


class MicroBatchSampler(torch.utils.data.Sampler):
    """This rank's sample indices of global micro-batches `start`, ..., `stop - 1`.

    Runs in the main process (the loader sends each list to a worker) and owns its
    PlanCache, since it runs ahead of the loop by the prefetch depth.
    """

    def __init__(self, plans: PlanCache, rank: int, start: int, stop: int):
        self.plans, self.rank, self.start, self.stop = plans, rank, start, stop

    def __iter__(self):
        for m in range(self.start, self.stop):
            yield self.plans.local(m, self.rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _reopen_in_worker(worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.reopen()


def make_loader(dataset: CacheDataset, sampler: MicroBatchSampler, pad_id: int, workers: int = 0,
                pin_memory: bool = False, codec=None, prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """Collated micro-batches in plan order; `codec` set = decode the teacher records in the workers too.

    The loader gets its own generator: creating its iterator draws a seed for the
    workers, and drawing it from the global RNG would shift that stream on resume.
    """
    fn = functools.partial(collate, pad_id=pad_id) if codec is None else \
        functools.partial(collate_decoded, pad_id=pad_id, codec=codec)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=fn,
                                       pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers else None,
                                       worker_init_fn=_reopen_in_worker if workers else None,
                                       generator=torch.Generator().manual_seed(0), persistent_workers=False)
