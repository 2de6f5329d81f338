"""Sparse teacher distributions <-> fixed-size byte records.

A teacher's next-token distribution at one position is kept as its top-k token
ids, their log-probabilities, and the log of the residual mass outside the top-k.
A codec turns M such rows into an uint8 array of shape [M, record_bytes] and back.
Codecs are pure torch, so they run on the device the logits are on, and
deterministic, so a resumed capture writes byte-identical shards.

Decoding always returns a proper distribution: the top-k probabilities are
rescaled so that sum(exp(logprobs)) + exp(log_residual) == 1 (quantization error
is pushed into the top-k shape, never into the residual the codec stored).

Codecs (byte layouts in docs/cache_codec.md, measurements in docs/benchmarks.md):
    fp16      exact ids (2 or 4 bytes), float16 log-probs and residual. A reference.
    ef4..ef8  Elias-Fano coded id set, 4..8-bit companded log-probs relative to the
              top-1, 10-bit residual; exactly k entries.
    vk64, vk128, vk198  fixed 64 / 128 / 198-byte records keeping as many of the row's top
              entries as fit, up to k (distill/cache/codec_vk.py). `default` is vk64, `hifi` vk198.

A vk codec may code ids as ranks in a teacher-calibrated id order (`make_codec(..., id_order=)`,
stored in the cache as id_order.npy); readers build the codec with
`distill.cache.manifest.codec_from_manifest`.

A row that leaves tokens outside it decodes with a residual of at least
`tail.RESIDUAL_FLOOR` (log 2.4e-7) under every codec (distill/cache/tail.py).

Records are fixed-size, so a cache stays sliceable; k comes from the recipe (`cache.top_k`).
For ef/fp16 the size follows from (codec, k, V) (ef6 with k = 26 is 64 bytes at V = 49,152);
for vk codecs it is the name's, and k is the most entries a row keeps (48 suits vk64, 128 vk198).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from distill.cache.codec_vk import VarKCodec
from distill.cache.tail import RESIDUAL_BITS, RESIDUAL_FLOOR, residual_code


# Rows are processed in blocks of at most this many logits (2 MiB in fp32) so that each pass
# over a block stays in cache; a whole [2048, V] chunk (400 MB at V = 49,152) would stream
# from memory on every pass (bench/capture_bench.py).
TOPK_BLOCK_ELEMENTS = 1 << 19


def sparse_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of a distribution given as logits.

    logits: [M, V] (any float dtype). Returns ids [M, k] int64, logprobs [M, k] fp32,
    log_residual [M] fp32 = log of the probability mass outside the top-k (-inf when k == V,
    or when the tail is below float rounding: about 1e-7 of the mass).
    """
    M, V = logits.shape
    k = min(k, V)
    rows = max(1, TOPK_BLOCK_ELEMENTS // V) if logits.device.type == "cpu" else max(M, 1)
    parts = [_sparse_block(logits[i:i + rows], k) for i in range(0, M, rows)] or [_sparse_block(logits, k)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _sparse_block(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Top-k, then one fused logsumexp of the logits shifted by their max (the top-1): no
    # log_softmax copy and no scattered copy for the tail, which read and write [M, V] more.
    x = logits.float()
    top, ids = torch.topk(x, k, dim=-1)
    d = top - top[:, :1]  # log-probs relative to the top-1, <= 0
    log_s = torch.logsumexp(x - top[:, :1], dim=-1)  # log sum_v p_v / p_top >= 0
    top_lp = d - log_s.unsqueeze(-1)
    if k == x.shape[-1]:
        return ids, top_lp, torch.full_like(log_s, float("-inf"))
    # Tail = 1 - (top-k sum) / (total sum), in float64. log_s is small exactly when the tail is
    # (a peaked row), and a float near 0 is precise, so tiny tails keep their precision.
    s = torch.exp(log_s.double())
    tail = (s - torch.exp(d.double()).sum(-1)) / s
    return ids, top_lp, torch.log(tail.clamp(min=0)).float()


def normalize_sparse(logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
    """Rescale the top-k so that top-k mass + residual mass == 1; returns new logprobs."""
    top_mass = torch.logsumexp(logprobs, dim=-1)
    keep = torch.log1p(-torch.exp(log_residual).clamp(max=1 - 1e-7))
    return logprobs - top_mass.unsqueeze(-1) + keep.unsqueeze(-1)


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


def _check_rows(codec, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> None:
    """Shapes, id range and NaNs; a bad row would otherwise decode to a plausible wrong one."""
    M, k = ids.shape[0], codec.k
    if ids.shape != (M, k) or logprobs.shape != (M, k) or log_residual.shape != (M,):
        raise ValueError(f"{codec.name}: expected ids/logprobs [M, {k}] and log_residual [M], got "
                         f"{tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(log_residual.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{codec.name}: ids must be integers, got {ids.dtype}")
    if M and (bool((ids < 0).any()) or bool((ids >= codec.vocab_size).any())):
        raise ValueError(f"{codec.name}: token ids must lie in [0, {codec.vocab_size})")
    if bool(torch.isnan(logprobs).any()) or bool(torch.isnan(log_residual).any()):
        raise ValueError(f"{codec.name}: NaN in log-probabilities")


# -- byte-aligned helpers (fp16 codec) ------------------------------------------------------------

def _pack_uint(values: torch.Tensor, nbytes: int) -> torch.Tensor:
    """[M, n] non-negative ints -> [M, n * nbytes] uint8, little-endian."""
    v = values.to(torch.int64)
    parts = [((v >> (8 * b)) & 0xFF).to(torch.uint8) for b in range(nbytes)]
    return torch.stack(parts, dim=-1).reshape(v.shape[0], v.shape[1] * nbytes)


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
    """Exact ids, float16 log-probabilities and residual.

    Record layout (little-endian, `id_bytes` = 2 if V <= 65536 else 4):
        ids        k * id_bytes   unsigned ints
        logprobs   k * 2          float16 log-probabilities
        residual   2              float16 log of the mass outside the top-k
    """

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
        _check_rows(self, ids, logprobs, log_residual)
        # -inf (k == V, or a tail below fp32 rounding) is stored as the float16 minimum; decoding
        # raises the residual to the floor every codec shares.
        res = log_residual.float().clamp(min=-60000.0).unsqueeze(-1)
        lp = logprobs.float().clamp(min=-60000.0)
        return torch.cat([_pack_uint(ids, self.id_bytes), _f16_bytes(lp), _f16_bytes(res)], dim=-1)

    def decode(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, record_bytes] uint8 -> ids [M, k] int64, logprobs [M, k] fp32, log_residual [M] fp32."""
        k, ib = self.k, self.id_bytes
        ids = _unpack_uint(records[:, : k * ib], k, ib)
        lp = _bytes_f16(records[:, k * ib : k * ib + 2 * k], k)
        res = _bytes_f16(records[:, k * ib + 2 * k :], 1).squeeze(-1)
        if self.k == self.vocab_size:
            res = torch.full_like(res, float("-inf"))
        else:
            res = res.clamp(min=RESIDUAL_FLOOR)
        return ids, normalize_sparse(lp, res), res

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "vocab_size": self.vocab_size,
                "record_bytes": self.record_bytes, "id_bits": 8 * self.id_bytes, "value": "float16"}


# -- bit streams (ef codecs) ----------------------------------------------------------------------
# A record is one little-endian bit stream: bit j lives in byte j // 8 at position j % 8
# (numpy: np.unpackbits(record, bitorder="little")). Fields are written LSB first.

def _to_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """[M, n] ints in [0, 2**width) -> [M, n * width] uint8 0/1, each value LSB first."""
    shifts = torch.arange(width, dtype=torch.int32, device=values.device)
    bits = (values.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.to(torch.uint8).reshape(len(values), values.shape[1] * width)


def _from_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """[M, n * width] uint8 0/1 -> [M, n] int64."""
    shifts = torch.arange(width, dtype=torch.int32, device=bits.device)
    return (bits.reshape(len(bits), bits.shape[1] // width, width).to(torch.int32) << shifts).sum(-1)


def _pack_bits(bits: torch.Tensor, nbytes: int) -> torch.Tensor:
    """[M, nbits] uint8 0/1 -> [M, nbytes] uint8, zero-padded."""
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - bits.shape[1])).view(len(bits), nbytes, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(records: torch.Tensor) -> torch.Tensor:
    """[M, nbytes] uint8 -> [M, nbytes * 8] uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=records.device)
    return ((records.unsqueeze(-1) >> shifts) & 1).reshape(len(records), records.shape[1] * 8)


@dataclass(frozen=True)
class EliasFanoCodec:
    """Elias-Fano coded id set, companded log-probs relative to the top-1, quantized residual.

    Ids are stored as a sorted set (Elias-Fano: k * (l + 1) + ((V - 1) >> l) bits with
    l = floor(log2(V / k)), ~log2(V / k) + 2 bits an id instead of ceil(log2 V)); the order of
    the top-k is carried by the values themselves. Each value is the log-prob relative to the
    row's maximum, d <= 0, coded with `value_bits` bits on a per-row range [lo, 0]:
        y = exp(GAMMA * d),  w = exp(GAMMA * lo),  code = round((y - w) / (1 - w) * (2**bits - 1))
    i.e. uniform in p**GAMMA, so large probabilities get fine steps and tiny ones coarse steps.
    Only the top-1 gets the highest code, so the decoded argmax is always the true one. The
    residual mass r is stored as floor(sqrt(r) * 2**RESIDUAL_BITS) and decoded at the cell middle.
    """

    k: int
    vocab_size: int
    value_bits: int
    name: str

    GAMMA = 0.2  # compander exponent (bench/codec_bench.py: 0.1..0.3 are within 0.0002 TVD)
    LO_BITS = 6  # per-row range: lo = -LO_RANGE * (q + 1) / 2**LO_BITS
    LO_RANGE = 24.0  # relative log-probs below -24 (p < 4e-11 * p_top1) are clamped
    RESIDUAL_BITS = RESIDUAL_BITS  # the residual code shared with the vk codecs (tail.py)

    def __post_init__(self):
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"{self.name}: need 1 <= k <= vocab_size, got k={self.k}, V={self.vocab_size}")
        if not 1 <= self.value_bits <= 16:
            raise ValueError(f"{self.name}: value_bits must be in 1..16, got {self.value_bits}")

    @property
    def low_bits(self) -> int:
        """Elias-Fano low part: the largest l with k * 2**l <= V."""
        return (self.vocab_size // self.k).bit_length() - 1

    @property
    def upper_bits(self) -> int:
        return self.k + ((self.vocab_size - 1) >> self.low_bits)

    @property
    def record_bits(self) -> int:
        return (self.RESIDUAL_BITS + self.LO_BITS + self.k * self.value_bits
                + self.k * self.low_bits + self.upper_bits)

    @property
    def record_bytes(self) -> int:
        return (self.record_bits + 7) // 8

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
        """ids [M, k] int (any order, distinct), logprobs [M, k] float, log_residual [M] float
        -> [M, record_bytes] uint8."""
        _check_rows(self, ids, logprobs, log_residual)
        ids = ids.to(torch.int64)
        sid, order = torch.sort(ids, dim=-1)
        if self.k > 1 and bool((sid[:, 1:] == sid[:, :-1]).any()):
            raise ValueError(f"{self.name}: token ids within a row must be distinct")
        lp = logprobs.float()
        top = lp.argmax(dim=-1, keepdim=True)
        d = (lp - lp.gather(-1, top)).gather(-1, order)  # relative log-probs in id order, <= 0
        is_top = order == top
        q_lo, lo = self._range(d.min(dim=-1).values)
        n = (1 << self.value_bits) - 1
        w = torch.exp(self.GAMMA * lo).unsqueeze(-1)
        y = torch.exp(self.GAMMA * torch.maximum(d, lo.unsqueeze(-1)))
        code = torch.round((y - w) / (1 - w) * n).clamp(0, n)
        # Keep the top code for the top-1 alone, so ties can never flip the decoded argmax.
        code = torch.where(is_top, torch.full_like(code, n), code.clamp(max=max(n - 1, 0)))
        res_code = residual_code(log_residual.float())
        low, upper = self._ef_encode(sid)
        # Fields end to end: residual, lo, k value codes, k Elias-Fano low parts, the upper bit vector.
        bits = torch.cat([_to_bits(res_code.unsqueeze(-1), self.RESIDUAL_BITS),
                          _to_bits(q_lo.unsqueeze(-1), self.LO_BITS), _to_bits(code, self.value_bits),
                          _to_bits(low, self.low_bits), upper], dim=-1)
        return _pack_bits(bits, self.record_bytes)

    def decode(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, record_bytes] uint8 -> ids [M, k] int64, logprobs [M, k] fp32, log_residual [M] fp32.

        Entries come out in descending probability (ties: ascending id), like `sparse_from_logits`.
        """
        if records.ndim != 2 or records.shape[1] != self.record_bytes:
            raise ValueError(f"{self.name}: expected records [M, {self.record_bytes}], got {tuple(records.shape)}")
        bits = _unpack_bits(records)
        k, o = self.k, 0
        fields = []
        for n, width in ((1, self.RESIDUAL_BITS), (1, self.LO_BITS), (k, self.value_bits), (k, self.low_bits)):
            fields.append(_from_bits(bits[:, o:o + n * width], width) if width else torch.zeros_like(bits[:, :n]))
            o += n * width
        res_code, q_lo, code, low = fields[0][:, 0], fields[1][:, 0], fields[2], fields[3].to(torch.int64)
        ids = self._ef_decode(low, bits[:, o:o + self.upper_bits])
        lo = -self.LO_RANGE * (q_lo.float() + 1) / (1 << self.LO_BITS)
        w = torch.exp(self.GAMMA * lo).unsqueeze(-1)
        n = (1 << self.value_bits) - 1
        d = torch.log(w + code.float() / n * (1 - w)) / self.GAMMA
        if k == self.vocab_size:
            res = torch.full((len(records),), float("-inf"), device=records.device)
        else:
            sq = (res_code.float() + 0.5) / (1 << self.RESIDUAL_BITS)
            res = 2 * torch.log(sq)
        lp = normalize_sparse(d, res)
        lp, order = torch.sort(lp, dim=-1, descending=True, stable=True)
        return ids.gather(-1, order), lp, res

    def _range(self, dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest grid value lo <= dmin (clamped to -LO_RANGE): code and value."""
        cells = 1 << self.LO_BITS
        q = (torch.ceil(-dmin * cells / self.LO_RANGE) - 1).clamp(0, cells - 1)
        return q.to(torch.int64), -self.LO_RANGE * (q + 1) / cells

    def _ef_encode(self, sid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted ids [M, k] -> low parts [M, k] and the upper bit vector [M, upper_bits]."""
        lb = self.low_bits
        low = sid & ((1 << lb) - 1)
        pos = (sid >> lb) + torch.arange(self.k, device=sid.device)  # strictly increasing
        upper = torch.zeros((len(sid), self.upper_bits), dtype=torch.uint8, device=sid.device)
        upper.scatter_(1, pos, 1)
        return low, upper

    def _ef_decode(self, low: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        rank = upper.to(torch.int64).cumsum(-1)
        if len(upper) and not bool((rank[:, -1] == self.k).all()):
            raise ValueError(f"{self.name}: corrupt record (Elias-Fano upper part does not hold {self.k} ids)")
        # The j-th set bit (rank j+1) sits at position high_j + j; unset bits go to a spare column.
        slot = torch.where(upper.bool(), rank - 1, torch.full_like(rank, self.k))
        pos = torch.zeros((len(upper), self.k + 1), dtype=torch.int64, device=upper.device)
        pos.scatter_(1, slot, torch.arange(self.upper_bits, device=upper.device).expand_as(slot))
        high = pos[:, : self.k] - torch.arange(self.k, device=upper.device)
        return (high << self.low_bits) | low

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "vocab_size": self.vocab_size,
                "record_bytes": self.record_bytes, "layout": "elias-fano-v1",
                "value_bits": self.value_bits, "gamma": self.GAMMA, "lo_bits": self.LO_BITS,
                "lo_range": self.LO_RANGE, "residual_bits": self.RESIDUAL_BITS,
                "ef_low_bits": self.low_bits, "ef_upper_bits": self.upper_bits}


Codec = Union[Fp16Codec, EliasFanoCodec, VarKCodec]
CodecFactory = Callable[[int, int], Codec]


def _ef(bits: int) -> CodecFactory:
    return lambda k, v: EliasFanoCodec(k=k, vocab_size=v, value_bits=bits, name=f"ef{bits}")


# vk<bytes>: the record size is the name's; k (the recipe's top_k) is the most entries a row keeps.
VK = {"vk64": (64, 7), "vk128": (128, 8), "vk198": (198, 8)}  # name -> (record bytes, value bits)


def _vk(name: str) -> CodecFactory:
    nbytes, bits = VK[name]
    return lambda k, v: VarKCodec(k=k, vocab_size=v, budget=nbytes, value_bits=bits, name=name)


# name -> factory(k, vocab_size). "default" and "hifi" were picked by measurement
# (bench/codec_bench.py, docs/benchmarks.md); they describe themselves by their concrete name,
# so a cache written under "default" stays readable if the default ever changes.
CODECS: dict[str, CodecFactory] = {
    "fp16": lambda k, v: Fp16Codec(k=k, vocab_size=v),
    **{f"ef{b}": _ef(b) for b in range(4, 9)},
    **{name: _vk(name) for name in VK},
    "default": _vk("vk64"),
    "hifi": _vk("vk198"),
}


# The recipe's cache.top_k when it leaves it out: the measured settings of docs/benchmarks.md
# (a vk codec keeps as many entries as fit its record, up to k; 48 and 128 are above what a
# 64 B / 198 B record holds on real text, so they do not cap it).
DEFAULT_TOP_K: dict[str, int] = {"default": 48, "hifi": 128, "vk64": 48, "vk128": 80, "vk198": 128,
                                 "ef6": 26, "ef7": 86}


def make_codec(name: str, k: int, vocab_size: int, id_order=None) -> Codec:
    """The codec `name` at (k, V). id_order (vk codecs only): a permutation of range(V) whose
    ranks are coded instead of the raw ids (codec_vk.py). ef codecs store an id *set* sorted by
    id and fp16 stores ids verbatim, so an order would buy them nothing: they refuse one."""
    if name not in CODECS:
        raise KeyError(name)
    codec = CODECS[name](k, vocab_size)
    if id_order is not None:
        if not isinstance(codec, VarKCodec):
            raise ValueError(f"{name}: only vk codecs take an id_order")
        codec = dataclasses.replace(codec, id_order=id_order)
    return codec
