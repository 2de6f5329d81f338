"""Fixed-size records holding a variable number of entries ("vk" codecs).

Each record is a fixed byte budget; a row keeps as many of its highest-probability entries
as fit (k_row <= k, k = the recipe's `cache.top_k`), so rows whose top ids are cheap to
code keep more of them. Entries are kept in rank order (descending probability):
- ids: each coded alone with Exp-Golomb of a per-row order. Top-k ids concentrate at small
  ids in BPE vocabularies (frequent tokens have small ids): ~12.7 bits an id at 64 bytes
  on the SmolLM2 workload, where a set code (Elias-Fano) needs ~12.8 and cannot give the order;
- values: companded codes uniform in (p / p_top)**GAMMA, non-increasing in rank order, so
  the differences are small and Exp-Golomb coded (~2-3 bits a value at 7-8 bit precision);
- the residual: 10 bits, as in the ef codecs, now holding the mass of the dropped entries too.
Byte layout and a numpy decoder: docs/cache_codec.md. Measurements: docs/benchmarks.md.

Decoding gives fixed-shape [M, k] tensors: entries k_row..k-1 are padding, the largest ids
not in the row, each holding the uniform share R / (V - k_row) of the residual R, and the
returned residual is R (V - k) / (V - k_row). The padded row is then exactly "top-k_row +
R spread uniformly over the other V - k_row ids", proper, and the loss needs no change.

With an `id_order` (a permutation of range(V), id_order[r] = the id of rank r), ids are coded
as their ranks in that order instead of as raw ids: the rank is what the record stores and
what ties and padding are decided on, and decoding maps ranks back with id_order[rank]. Capture
builds the order from the teacher itself (ids by how often they are in its top-128 over a
calibration sample, distill/cache/capture.py), so the ids a row keeps are small numbers and
cheap to code: ~1.65 bits an id less, ~12% more entries at the same bytes (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from distill.cache.tail import RESIDUAL_BITS, largest_free_ids, residual_code

LAYOUT = "variable-k-v1"
ORDERED_LAYOUT = "variable-k-ordered-v1"  # ids coded as ranks in a teacher-calibrated order
ID_ORDER_FILE = "id_order.npy"  # the order in a cache directory: int32 [V], named in the manifest
ID_ORDER_TOP = 128  # an id's calibration count: the rows whose top-128 hold it


def id_order_from_topk(top_ids: torch.Tensor, vocab_size: int, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Count top-ID_ORDER_TOP membership: top_ids [M, >= 1] (descending probability) -> counts [V] int64,
    added to `counts` when given (so calibration can run batch by batch)."""
    c = torch.bincount(top_ids[:, :ID_ORDER_TOP].reshape(-1).cpu(), minlength=vocab_size)
    return c if counts is None else counts + c


def order_from_counts(counts: torch.Tensor) -> np.ndarray:
    """Ids sorted by descending count, ties by ascending id: int32 [V], order[rank] = id."""
    return torch.sort(-counts.to(torch.int64), stable=True).indices.numpy().astype(np.int32)


def id_order_sha256(order: np.ndarray) -> str:
    """sha256 of the order as written to ID_ORDER_FILE (np.save of int32 [V]: the file's hash)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.asarray(order, dtype=np.int32)), allow_pickle=False)
    return hashlib.sha256(buf.getvalue()).hexdigest()

def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bit length of ints in [1, 2**24) as int32: the float32 exponent (exact below 2**24)."""
    return (x.to(torch.float32).view(torch.int32) >> 23) - 126


def eg_len(x: torch.Tensor, r) -> torch.Tensor:
    """Length in bits of the order-r Exp-Golomb code of x >= 0 (int32, x < 2**24 - 2**r):
    2 * bitlen((x >> r) + 1) - 1 + r == 2 * bitlen(x + 2**r) - r - 1, the bit length read off
    the float32 exponent."""
    e = (x + (1 << r)).to(torch.float32).view(torch.int32)
    return ((e >> 22) & -2) - 253 - r


def _prefix_bits(x: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, n] int32, orders [R, M, 1] -> for every prefix length j = 1..n, the fewest bits that
    x[:, :j] takes under one of the orders and that order: ([M, n], [M, n])."""
    orders = orders.expand(-1, x.shape[0], 1).to(torch.int32)
    if x.shape[1] == 0:
        return torch.zeros_like(x), torch.zeros_like(x)
    best, arg = eg_len(x.unsqueeze(0), orders).cumsum(-1, dtype=torch.int32).min(0)
    return best, orders.squeeze(-1).t().gather(1, arg.to(torch.int64))


def _write(nbytes: int, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Fields [M, F] (value < 2**32, bit offset; value 0 writes nothing) -> [M, nbytes] uint8.

    Each field touches at most two 32-bit words. Fields never overlap, so adding what they
    put in a word is the same as or-ing their bits.
    """
    M = values.shape[0]
    v, o = values.to(torch.int64), offsets.to(torch.int64)
    word, shift = o >> 5, o & 31
    moved = v << shift  # < 2**63
    nwords = (nbytes + 3) // 4 + 1
    out = torch.zeros((M, nwords + 1), dtype=torch.int64, device=values.device)
    out.scatter_add_(1, word, moved & 0xFFFFFFFF)
    out.scatter_add_(1, word + 1, moved >> 32)
    b = torch.arange(4, device=values.device) * 8
    return ((out[:, :nwords].unsqueeze(-1) >> b) & 0xFF).to(torch.uint8).reshape(M, -1)[:, :nbytes]


def _words(records: torch.Tensor) -> torch.Tensor:
    """[M, nbytes] uint8 -> [M, nwords + 2] int64, little-endian 32-bit words (zero-padded)."""
    M, nbytes = records.shape
    nwords = (nbytes + 3) // 4 + 2
    padded = torch.nn.functional.pad(records, (0, 4 * nwords - nbytes)).to(torch.int64).view(M, nwords, 4)
    return (padded << (torch.arange(4, device=records.device) * 8)).sum(-1)


def _read(words: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Fields [M, F] at bit offsets, of widths <= 32 -> [M, F] int64 (reads past the end give 0)."""
    o = offsets.to(torch.int64)
    word = (o >> 5).clamp(max=words.shape[1] - 2)
    shift = o & 31
    lo, hi = words.gather(1, word), words.gather(1, word + 1)
    both = (lo >> shift) | ((hi & ((1 << shift) - 1)) << (32 - shift))
    return both & ((1 << widths.to(torch.int64)) - 1)


@dataclass(frozen=True)
class VarKCodec:
    """Up to k entries per fixed-size record, ids and value steps Exp-Golomb coded in rank order."""

    k: int  # k_max: decoded rows have k entries, padding included
    vocab_size: int
    budget: int  # record_bytes
    value_bits: int
    name: str
    # Permutation of range(V) (order[rank] = id) or None (ranks are the raw ids). Not compared:
    # describe() carries its hash.
    id_order: Optional[object] = field(default=None, compare=False, repr=False)

    GAMMA = 0.35  # compander exponent (bench: 0.2..0.5 within 0.0005 TVD)
    LO_RANGE = 24.0  # relative log-probs below -24 are raised to -24 (fixed range, no per-row field)
    RESIDUAL_BITS = RESIDUAL_BITS  # the residual code shared with the ef codecs (tail.py)
    ID_ORDER_BITS = 4  # Exp-Golomb order of the ids, 0..15
    VALUE_ORDER_BITS = 2  # Exp-Golomb order of the value steps, 0..3

    def __post_init__(self):
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"{self.name}: need 1 <= k <= vocab_size, got k={self.k}, V={self.vocab_size}")
        if not 1 <= self.value_bits <= 16:
            raise ValueError(f"{self.name}: value_bits must be in 1..16, got {self.value_bits}")
        if self.vocab_size > 1 << 24:
            raise ValueError(f"{self.name}: vocab_size must be <= 2**24, got {self.vocab_size}")
        worst_top1 = min(2 * ((self.vocab_size - 1 >> r) + 1).bit_length() - 1 + r
                         for r in range(1 << self.ID_ORDER_BITS))
        if self.header_bits + worst_top1 > 8 * self.budget:
            raise ValueError(f"{self.name}: {self.budget} bytes cannot hold one entry at V={self.vocab_size}")
        if self.id_order is not None:
            order = torch.as_tensor(np.asarray(self.id_order), dtype=torch.int64).reshape(-1)
            if len(order) != self.vocab_size or not torch.equal(torch.sort(order).values,
                                                                   torch.arange(self.vocab_size)):
                raise ValueError(f"{self.name}: id_order must be a permutation of range({self.vocab_size})")
            rank = torch.empty_like(order)
            rank[order] = torch.arange(self.vocab_size)
            # Per-device copies of (order, rank of each id), made on first use.
            object.__setattr__(self, "_maps", {order.device: (order, rank)})
            object.__setattr__(self, "_sha256", id_order_sha256(order.numpy()))

    def _map(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, rank): order[rank] = id, rank[id] = rank, on `device`."""
        maps = self._maps
        device = torch.device(device)
        if device not in maps:
            maps[device] = tuple(t.to(device) for t in maps[torch.device("cpu")])
        return maps[device]

    @property
    def count_bits(self) -> int:
        return max(1, (self.k - 1).bit_length())

    @property
    def header_bits(self) -> int:
        return self.RESIDUAL_BITS + self.count_bits + self.ID_ORDER_BITS + self.VALUE_ORDER_BITS

    @property
    def record_bytes(self) -> int:
        return self.budget

    # -- encode ------------------------------------------------------------------------------------

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
        """ids [M, k] int (distinct), logprobs [M, k] float, log_residual [M] float -> [M, record_bytes] uint8.

        Keeps the k_row most probable entries that fit; their dropped mass joins the residual.
        """
        self._check(ids, logprobs, log_residual)
        M, k, dev = ids.shape[0], self.k, ids.device
        if self.id_order is not None:
            ids = self._map(dev)[1][ids.to(torch.int64)]  # from here on, "ids" are ranks in the order
        # Canonical rank order (descending log-prob, ties by ascending id): records depend on the set only.
        sid, by_id = torch.sort(ids.to(torch.int64), dim=-1)
        if k > 1 and bool((sid[:, 1:] == sid[:, :-1]).any()):
            raise ValueError(f"{self.name}: token ids within a row must be distinct")
        lp, rank = torch.sort(logprobs.float().gather(-1, by_id), dim=-1, descending=True, stable=True)
        x = sid.gather(-1, rank)
        code = self._quantize(lp - lp[:, :1])
        step = code[:, :-1] - code[:, 1:]  # >= 0: codes are non-increasing in rank order
        # Bits of the first j entries under each order, cheapest order per prefix (ids and steps separately).
        room = 8 * self.budget - self.header_bits
        x32 = x.to(torch.int32)
        st_bits, st_arg = _prefix_bits(step.to(torch.int32),
                                       torch.arange(1 << self.VALUE_ORDER_BITS, device=dev).view(-1, 1, 1))
        st_bits, st_arg = (torch.nn.functional.pad(t, (1, 0)) for t in (st_bits, st_arg))  # the top-1 has no step
        # Id orders coarse to fine: the bits of a prefix are (nearly) convex in the order, so the best
        # order lies within 2 of the best of 3, 6, 9, 12; the second pass tries those neighbours.
        coarse = torch.tensor([3, 6, 9, 12], device=dev).view(-1, 1, 1)
        id_bits, id_arg = _prefix_bits(x32, coarse)
        k_row = ((id_bits + st_bits) <= room).sum(-1).clamp(min=1)
        near = id_arg.gather(-1, (k_row - 1).unsqueeze(-1))
        fine = (near + torch.tensor([-2, -1, 0, 1, 2], device=dev).view(-1, 1, 1)).clamp(0, 15)
        id_bits, id_arg = _prefix_bits(x32, fine)
        # Prefix bits only grow with the prefix, so this counts the longest prefix that fits; 1 entry always fits.
        k_row = ((id_bits + st_bits) <= room).sum(-1).clamp(min=1)
        last = (k_row - 1).unsqueeze(-1)
        r_id, r_v = id_arg.gather(-1, last).squeeze(-1), st_arg.gather(-1, last).squeeze(-1)
        j = torch.arange(k, device=dev)
        dropped = torch.logsumexp(torch.where(j >= last + 1, lp, float("-inf")), -1)
        res_code = residual_code(torch.logaddexp(log_residual.float(), dropped))

        # Symbols in stream order: ids 0..k_row-1, then value steps 1..k_row-1 (slots past those are empty).
        s = torch.arange(2 * k - 1, device=dev)
        is_id = s < k_row.unsqueeze(-1)
        valid = s < (2 * k_row - 1).unsqueeze(-1)
        step_idx = (s - k_row.unsqueeze(-1)).clamp(0, max(k - 2, 0))
        val = torch.where(is_id, x.gather(-1, s.clamp(max=k - 1).expand(M, -1)),
                          step.gather(-1, step_idx) if k > 1 else torch.zeros_like(s).expand(M, -1))
        val = torch.where(valid, val, 0)
        order = torch.where(is_id, r_id.unsqueeze(-1), r_v.unsqueeze(-1)).to(torch.int64)
        q = (val >> order) + 1
        prefix = (_bit_length(q) - 1).to(torch.int64)  # unary part: `prefix` zeros, then a one
        suffix = ((q - (1 << prefix)) << order) | (val & ((1 << order) - 1))
        width = torch.where(valid, prefix + order, 0)
        H = self.header_bits
        ones = H + torch.cumsum(torch.where(valid, prefix + 1, 0), -1) - 1
        unary_end = ones[:, -1:] + 1
        suffix_at = unary_end + torch.cumsum(width, -1) - width
        header = torch.stack([res_code, k_row - 1, r_id, r_v], -1).to(torch.int64)
        header_at = torch.tensor([0, self.RESIDUAL_BITS, self.RESIDUAL_BITS + self.count_bits,
                                  H - self.VALUE_ORDER_BITS], device=dev).expand(M, -1)
        values = torch.cat([header, valid.to(torch.int64), torch.where(valid, suffix, 0)], -1)
        offsets = torch.cat([header_at, torch.where(valid, ones, 0), torch.where(valid, suffix_at, 0)], -1)
        return _write(self.budget, values, offsets)

    # -- decode ------------------------------------------------------------------------------------

    def decode(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, record_bytes] uint8 -> ids [M, k] int64, logprobs [M, k] fp32, log_residual [M] fp32.

        Entries 0..k_row-1 are the stored ones in rank order; k_row..k-1 the padding.
        """
        if records.ndim != 2 or records.shape[1] != self.budget or records.dtype != torch.uint8:
            raise ValueError(f"{self.name}: expected uint8 records [M, {self.budget}], got "
                             f"{records.dtype} {tuple(records.shape)}")
        M, k, V, dev = records.shape[0], self.k, self.vocab_size, records.device
        H = self.header_bits
        words = _words(records)
        widths = torch.tensor([self.RESIDUAL_BITS, self.count_bits, self.ID_ORDER_BITS, self.VALUE_ORDER_BITS],
                              device=dev)
        at = torch.cumsum(widths, 0) - widths
        res_code, count, r_id, r_v = _read(words, at.expand(M, -1), widths.expand(M, -1)).unbind(-1)
        k_row = count + 1
        if bool((k_row > k).any()):
            raise ValueError(f"{self.name}: corrupt record (more than {k} entries)")
        # Unary parts: the first 2 k_row - 1 one-bits after the header end the symbols' prefixes.
        shifts = torch.arange(8, dtype=torch.uint8, device=dev)
        bits = ((records.unsqueeze(-1) >> shifts) & 1).reshape(M, -1)[:, H:]
        rank = bits.cumsum(-1, dtype=torch.int16)
        need = (2 * k_row - 1).unsqueeze(-1)
        if M and bool((rank[:, -1:] < need).any()):
            raise ValueError(f"{self.name}: corrupt record (unary stream ends early)")
        row, col = (bits.bool() & (rank <= need)).nonzero(as_tuple=True)  # row-major: in stream order
        ones = torch.zeros((M, 2 * k - 1), dtype=torch.int64, device=dev)
        ones[row, rank[row, col].to(torch.int64) - 1] = col
        s = torch.arange(2 * k - 1, device=dev)
        valid = s < need
        prefix = torch.where(valid, ones - torch.nn.functional.pad(ones[:, :-1] + 1, (1, 0)), 0)
        is_id = s < k_row.unsqueeze(-1)
        order = torch.where(is_id, r_id.unsqueeze(-1), r_v.unsqueeze(-1))
        width = torch.where(valid, prefix + order, 0)
        if bool((width > 32).any()):
            raise ValueError(f"{self.name}: corrupt record (a code longer than 32 bits)")
        unary_end = H + ones.gather(1, need - 1) + 1
        suffix_at = unary_end + torch.cumsum(width, -1) - width
        if bool(((suffix_at[:, -1:] + width[:, -1:]) > 8 * self.budget).any()):
            raise ValueError(f"{self.name}: corrupt record (fields run past the record)")
        suffix = _read(words, suffix_at, width)
        val = (((1 << prefix) + (suffix >> order) - 1) << order) | (suffix & ((1 << order) - 1))
        j = torch.arange(k, device=dev)
        stored = j < k_row.unsqueeze(-1)
        ids = torch.where(stored, val[:, :k], 0)
        if bool((ids >= V).any()):
            raise ValueError(f"{self.name}: corrupt record (token id >= {V})")
        keyed = torch.sort(torch.where(stored, ids, V + j), dim=-1).values
        if k > 1 and bool((keyed[:, 1:] == keyed[:, :-1]).any()):
            raise ValueError(f"{self.name}: corrupt record (repeated token id)")
        n = (1 << self.value_bits) - 1
        steps = torch.where(stored[:, 1:], val.gather(1, (k_row.unsqueeze(-1) + j[1:] - 1).clamp(max=2 * k - 2)), 0)
        code = n - torch.nn.functional.pad(steps.cumsum(-1), (1, 0))
        if bool((code < 0).any()):
            raise ValueError(f"{self.name}: corrupt record (value code below 0)")
        w = math.exp(-self.GAMMA * self.LO_RANGE)
        d = torch.log(w + code.float() / n * (1 - w)) / self.GAMMA
        d = torch.where(stored, d, float("-inf"))
        full = k_row == V
        r = ((res_code.float() + 0.5) / (1 << self.RESIDUAL_BITS)) ** 2
        log_r = torch.where(full, float("-inf"), torch.log(r))
        keep = torch.where(full, 0.0, torch.log1p(-r))
        lp = d - torch.logsumexp(d, -1, keepdim=True) + keep.unsqueeze(-1)
        # Padding: the uniform share of R on the largest ids (ranks, with an order) not in the row;
        # the residual shrinks to match.
        spread = torch.log((V - k_row).clamp(min=1).float())
        lp = torch.where(stored, lp, (log_r - spread).unsqueeze(-1))
        ids = torch.where(stored, ids, largest_free_ids(ids, stored, k_row, V))
        if k == V:
            res = torch.full((M,), float("-inf"), device=dev)
        else:
            res = log_r + math.log(V - k) - spread
        if self.id_order is not None:
            ids = self._map(dev)[0][ids]  # ranks -> ids; the padding ranks map to distinct non-members
        return ids, lp, res

    def entries(self, records: torch.Tensor) -> torch.Tensor:
        """[M, record_bytes] uint8 -> [M] int64: how many entries each record stores (k_row)."""
        at = torch.tensor([[self.RESIDUAL_BITS]], device=records.device).expand(len(records), 1)
        return _read(_words(records), at, torch.full_like(at, self.count_bits))[:, 0] + 1

    # -- pieces ------------------------------------------------------------------------------------

    def _quantize(self, d: torch.Tensor) -> torch.Tensor:
        """Relative log-probs [M, k] (rank order, d[:, 0] == 0) -> codes, n for the top-1 alone."""
        n = (1 << self.value_bits) - 1
        w = math.exp(-self.GAMMA * self.LO_RANGE)
        y = torch.exp(self.GAMMA * d.clamp(min=-self.LO_RANGE))
        code = torch.round((y - w) / (1 - w) * n).clamp(0, max(n - 1, 0)).to(torch.int64)
        code[:, 0] = n  # the top-1 keeps the top code alone, so the decoded argmax is the true one
        return code

    def _check(self, ids: torch.Tensor, logprobs: torch.Tensor, log_residual: torch.Tensor) -> None:
        M, k = ids.shape[0], self.k
        if ids.shape != (M, k) or logprobs.shape != (M, k) or log_residual.shape != (M,):
            raise ValueError(f"{self.name}: expected ids/logprobs [M, {k}] and log_residual [M], got "
                             f"{tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(log_residual.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{self.name}: ids must be integers, got {ids.dtype}")
        if M and (bool((ids < 0).any()) or bool((ids >= self.vocab_size).any())):
            raise ValueError(f"{self.name}: token ids must lie in [0, {self.vocab_size})")
        if bool(torch.isnan(logprobs).any()) or bool(torch.isnan(log_residual).any()):
            raise ValueError(f"{self.name}: NaN in log-probabilities")

    def describe(self) -> dict:
        d = {"name": self.name, "k": self.k, "vocab_size": self.vocab_size,
             "record_bytes": self.record_bytes, "layout": LAYOUT, "value_bits": self.value_bits,
             "gamma": self.GAMMA, "lo_range": self.LO_RANGE, "residual_bits": self.RESIDUAL_BITS,
             "count_bits": self.count_bits, "id_order_bits": self.ID_ORDER_BITS,
             "value_order_bits": self.VALUE_ORDER_BITS, "padding": "largest-free-ids"}
        if self.id_order is not None:
            # A distinct layout: a reader that knows only variable-k-v1 must not take ranks for ids.
            d |= {"layout": ORDERED_LAYOUT, "padding": "largest-free-ranks",
                  "id_order": {"file": ID_ORDER_FILE, "sha256": self._sha256}}
        return d
