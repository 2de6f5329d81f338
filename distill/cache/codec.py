"""Sparse teacher distributions <-> fixed-size byte records.

A teacher's next-token distribution at one position is kept as its top-k token
ids, their log-probabilities, and the log of the residual mass outside the top-k.
A codec turns M such rows into an uint8 array of shape [M, record_bytes] and back.
Codecs are pure torch, so they run on the device the logits are on.

Decoding always returns a proper distribution: the top-k probabilities are
rescaled so that sum(exp(logprobs)) + exp(log_residual) == 1 (quantization error
is pushed into the top-k shape, never into the residual the codec stored).

Record layout of the `fp16` codec (little-endian, `id_bytes` = 2 if V <= 65536 else 4):
    ids        k * id_bytes   unsigned ints
    logprobs   k * 2          float16 log-probabilities
    residual   2              float16 log of the mass outside the top-k
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def sparse_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of a distribution given as logits.

    logits: [M, V] (any float dtype). Returns ids [M, k] int64, logprobs [M, k] fp32,
    log_residual [M] fp32 = log of the probability mass outside the top-k (-inf when k == V).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = min(k, logprobs.shape[-1])
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    rest = logprobs.scatter(-1, top_ids, float("-inf"))
    log_residual = torch.logsumexp(rest, dim=-1)
    return top_ids, top_lp, log_residual


def normalize_sparse(logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
    """Rescale the top-k so that top-k mass + residual mass == 1; returns new logprobs."""
    top_mass = torch.logsumexp(logprobs, dim=-1)
    keep = torch.log1p(-torch.exp(log_residual).clamp(max=1 - 1e-7))
    return logprobs - top_mass.unsqueeze(-1) + keep.unsqueeze(-1)


def _pack_uint(values: torch.Tensor, nbytes: int) -> torch.Tensor:
    """[M, n] non-negative ints -> [M, n * nbytes] uint8, little-endian."""
    v = values.to(torch.int64)
    parts = [((v >> (8 * b)) & 0xFF).to(torch.uint8) for b in range(nbytes)]
    return torch.stack(parts, dim=-1).reshape(v.shape[0], -1)


def _unpack_uint(data: torch.Tensor, n: int, nbytes: int) -> torch.Tensor:
    d = data.reshape(data.shape[0], n, nbytes).to(torch.int64)
    out = torch.zeros(d.shape[:2], dtype=torch.int64, device=data.device)
    for b in range(nbytes):
        out |= d[..., b] << (8 * b)
    return out


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[M, n] float -> [M, 2n] uint8 (float16 bits, little-endian)."""
    bits = x.to(torch.float16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return _pack_uint(bits, 2)


def _bytes_f16(data: torch.Tensor, n: int) -> torch.Tensor:
    bits = _unpack_uint(data, n, 2)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(torch.float16).float()


@dataclass(frozen=True)
class Fp16Codec:
    """Exact ids, float16 log-probabilities and residual."""

    k: int
    vocab_size: int
    name: str = "fp16"

    @property
    def id_bytes(self) -> int:
        return 2 if self.vocab_size <= 1 << 16 else 4

    @property
    def record_bytes(self) -> int:
        return self.k * self.id_bytes + self.k * 2 + 2

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
        """ids [M, k] int, logprobs [M, k] float, log_residual [M] float -> [M, record_bytes] uint8."""
        # -inf residual (k == V) is stored as the float16 minimum, i.e. ~zero mass.
        res = log_residual.float().clamp(min=-60000.0).unsqueeze(-1)
        lp = logprobs.float().clamp(min=-60000.0)
        return torch.cat([_pack_uint(ids, self.id_bytes), _f16_bytes(lp), _f16_bytes(res)], dim=-1)

    def decode(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, record_bytes] uint8 -> ids [M, k] int64, logprobs [M, k] fp32, log_residual [M] fp32."""
        k, ib = self.k, self.id_bytes
        ids = _unpack_uint(records[:, : k * ib], k, ib)
        lp = _bytes_f16(records[:, k * ib : k * ib + 2 * k], k)
        res = _bytes_f16(records[:, k * ib + 2 * k :], 1).squeeze(-1)
        return ids, normalize_sparse(lp, res), res

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "vocab_size": self.vocab_size,
                "record_bytes": self.record_bytes, "id_bits": 8 * self.id_bytes, "value": "float16"}


CodecFactory = Callable[[int, int], "Fp16Codec"]

# name -> factory(k, vocab_size). "default" is the codec picked by measurement (docs/benchmarks.md).
CODECS: dict[str, CodecFactory] = {
    "fp16": lambda k, v: Fp16Codec(k=k, vocab_size=v),
    "default": lambda k, v: Fp16Codec(k=k, vocab_size=v),
}


def make_codec(name: str, k: int, vocab_size: int):
    if name not in CODECS:
        raise KeyError(name)
    return CODECS[name](k, vocab_size)


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))
