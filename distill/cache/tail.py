"""The tail of a sparse teacher row: its floor, its quantization, and fitting a row to the student's vocabulary.

A decoded row is (ids [M, k], logprobs [M, k], log_residual [M]) with
sum(exp(logprobs)) + exp(log_residual) == 1; the residual is the teacher's mass on every token
outside the row, and the loss treats it as one bin (docs/loss.md).

The residual floor. Capture measures the tail as 1 - (top-k mass) in fp32 logits, so a tail
below ~1e-7 of the mass is rounding, not a measurement (`sparse_from_logits`). The quantized
codecs cannot store one either: their 10-bit residual code 0 decodes to
((0 + 0.5) / 2**10)**2 = 2.4e-7. Every codec therefore decodes a row that leaves tokens outside
it with a tail of at least RESIDUAL_FLOOR = log(2.4e-7) = -15.25: fp16 raises what it stored
(an exact 0 is stored as -60000) to the floor when decoding. One floor matters for reverse KL,
sum_b Q_b log(Q_b / P_b): with P_residual = exp(-60000) a peaked row cost ~80 nats under fp16
where the same row cost 17.8 under ef/vk.

Fitting to the student (`fit_vocab`, `student_codec`). The cache's V is the teachers' embedding
rows; a student of the same tokenizer may have fewer or more (padded) rows. Ids the student
lacks (>= its V: padding rows, never real tokens) move into the residual, so rows stay proper
distributions; the freed slots hold the largest ids the row lacks, each with the uniform share
of the tail (the vk codecs' padding, codec_vk.py). Extra student rows are tail mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.errors import DistillError

RESIDUAL_BITS = 10  # ef and vk codecs: the residual mass R as floor(sqrt(R) * 2**RESIDUAL_BITS)
RESIDUAL_FLOOR = 2 * math.log(0.5 / (1 << RESIDUAL_BITS))  # log R of code 0, decoded at the cell middle


def residual_code(log_residual: torch.Tensor) -> torch.Tensor:
    """log R [M] -> [M] int64 codes in [0, 2**RESIDUAL_BITS): a grid uniform in sqrt(R)."""
    cells = 1 << RESIDUAL_BITS
    r = torch.exp(log_residual).clamp(0, 1)
    return torch.floor(torch.sqrt(r) * cells).clamp(0, cells - 1).to(torch.int64)


def largest_free_ids(ids: torch.Tensor, stored: torch.Tensor, k_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[M, k]: at position j >= k_row, the (j - k_row)-th largest id in [0, V) not among the stored ones.

    ids [M, k] with the row's stored entries at positions < k_row (stored [M, k] marks them)."""
    M, k, V = ids.shape[0], ids.shape[1], vocab_size
    C = min(V, 2 * k)  # the top C ids hold at least k - k_row non-members
    slot = torch.where(stored & (ids >= V - C), V - 1 - ids, C)
    member = torch.zeros((M, C + 1), dtype=torch.uint8, device=ids.device).scatter_(1, slot, 1)[:, :C]
    free = torch.sort(member, dim=-1, stable=True).indices  # non-members first, largest id first
    j = torch.arange(k, device=ids.device)
    return V - 1 - free.gather(1, (j - k_row.unsqueeze(-1)).clamp(0, C - 1))


def fit_vocab(ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoded row over the student's vocabulary [0, V): ids [M, k], logprobs [M, k], log_residual [M]
    -> ids [M, k'], logprobs [M, k'], log_residual [M] with k' = min(k, V), still proper.

    Entries with id >= V join the tail T (residual + their mass, at least RESIDUAL_FLOOR while the
    student has tokens outside the row); the kept entries come first, in their order (scaled by
    (1 - T) / (1 - T_raw) where the floor raised the tail); the k' - n freed slots take the largest ids the row lacks with T / (V - n) each, and
    the residual is T (V - k') / (V - n). A row that already covers all V ids has no tail left
    for the lacking ids' mass: its entries are renormalised (they are all the student can predict).
    """
    M, k = ids.shape
    V = vocab_size
    k_out = min(k, V)
    lacks = ids >= V
    neg_inf = torch.tensor(float("-inf"), device=ids.device)
    raw = torch.logaddexp(log_residual, torch.logsumexp(torch.where(lacks, logprobs, neg_inf), -1))
    tail = raw.clamp(min=RESIDUAL_FLOOR) if k_out < V else raw
    n = (~lacks).sum(-1)  # entries kept, <= k_out (distinct ids below V)
    order = torch.sort(lacks.to(torch.int8), dim=-1, stable=True).indices[:, :k_out]
    ids, lp = ids.gather(1, order), logprobs.gather(1, order)
    stored = torch.arange(k_out, device=ids.device) < n.unsqueeze(-1)
    free = (V - n).clamp(min=1).to(logprobs.dtype)
    full = n == V  # every student id is in the row: nothing outside to hold the tail
    # The kept entries already hold 1 - raw; they are rescaled only where the floor raised the tail
    # (then raw < 2.4e-7 and 1 - raw is exact), never by a 1 - tail that rounding would blur.
    scale = torch.where(tail > raw, torch.log1p(-torch.exp(tail)) - torch.log1p(-torch.exp(raw)), 0.0)
    scale = torch.where(full, -torch.logsumexp(torch.where(stored, lp, neg_inf), -1), scale)
    lp = torch.where(stored, lp + scale.unsqueeze(-1), (tail - torch.log(free)).unsqueeze(-1))
    ids = torch.where(stored, ids, largest_free_ids(ids, stored, n, V))
    if k_out == V:
        res = torch.full_like(tail, float("-inf"))
    else:
        res = tail + math.log(V - k_out) - torch.log(free)
    return ids, lp, res


@dataclass(frozen=True)
class StudentCodec:
    """A cache codec whose decoded rows are fitted to a student vocabulary of `vocab_size` rows."""

    codec: object
    vocab_size: int

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def k(self) -> int:
        return min(self.codec.k, self.vocab_size)

    @property
    def record_bytes(self) -> int:
        return self.codec.record_bytes

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
        """A live teacher's rows, encoded as the cache's codec would (its vocabulary, not the student's)."""
        return self.codec.encode(ids, logprobs, log_residual)

    def decode(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, record_bytes] uint8 -> ids [M, k], logprobs [M, k], log_residual [M], ids < vocab_size."""
        return fit_vocab(*self.codec.decode(records), self.vocab_size)


def student_codec(codec, student_vocab: int, tokenizer_size: int, what: str = "student.model"):
    """The codec the student decodes the cache with; refuses a student that cannot hold every real token.

    The tokenizers are the same (the cache checks its fingerprint), so ids >= tokenizer_size are
    padding rows in whichever model has them: only student_vocab >= tokenizer_size matters."""
    cache_vocab = codec.vocab_size
    if student_vocab < tokenizer_size:
        raise DistillError(f"{what}: its vocabulary has {student_vocab} rows, fewer than the tokenizer's "
                           f"{tokenizer_size} tokens (the cache's teachers have {cache_vocab} rows); a student "
                           "must have a row for every token")
    return codec if student_vocab == cache_vocab else StudentCodec(codec, student_vocab)
