"""Cache codecs: exact ids, proper distributions, documented error bounds, determinism, bad input.

The numpy decoder printed in docs/cache_codec.md is executed here against the codec, so the
documented byte layout cannot drift from the code.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cache.codec import CODECS, EliasFanoCodec, make_codec, sparse_from_logits
from distill.cache.codec_vk import VarKCodec

ROOT = Path(__file__).resolve().parents[1]
EF = ["ef4", "ef5", "ef6", "ef7", "ef8"]
VK = ["vk64", "vk128", "vk198"]
# (V, k): V not a power of 2, V = 2**16 (ids fill 16 bits), V = 2**16 + 1, Llama-3's 128,256;
# k = 1, odd k, the default's k, k = V.
SHAPES = [(2, 1), (3, 3), (1000, 1), (1000, 7), (1000, 1000), (49152, 26), (49152, 86),
          (65536, 13), (65537, 5), (128256, 1), (128256, 26)]


@functools.lru_cache(maxsize=None)
def _rows(V: int, k: int, m: int = 20):
    """Top-k of random logits at several sharpness levels, incl. near-one-hot rows (cached: read-only)."""
    g = torch.Generator().manual_seed(V + k)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 40.0]).repeat(m // 5 + 1)[:m, None]
    logits = torch.randn(m, V, generator=g) * scale
    ids, lp, res = sparse_from_logits(logits, k)
    full = torch.log_softmax(logits, -1)
    # Exact log-probs of the chosen ids (sparse_from_logits rounds them ~1e-6 differently), so
    # the bounds below measure the codec alone.
    return full, ids, full.gather(1, ids), res


@pytest.mark.parametrize("name", ["fp16", *EF])
@pytest.mark.parametrize("V,k", SHAPES)
def test_round_trip_ids_exact_and_distribution_proper(name, V, k):
    codec = make_codec(name, k, V)
    full, ids, lp, res = _rows(V, k)
    rec = codec.encode(ids, lp, res)
    assert rec.dtype == torch.uint8 and rec.shape == (len(ids), codec.record_bytes)
    d_ids, d_lp, d_res = codec.decode(rec)
    assert d_ids.dtype == torch.int64 and d_lp.dtype == torch.float32 and d_res.dtype == torch.float32
    assert torch.equal(d_ids.sort(-1).values, ids.sort(-1).values)  # the same set of ids, exactly
    assert torch.equal(d_ids[:, 0], full.argmax(-1))  # the top-1 survives quantization
    total = d_lp.double().exp().sum(-1) + d_res.double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    if k == V:
        assert torch.isneginf(d_res).all()
    else:
        assert torch.isfinite(d_res).all()  # a stored tail is never exactly zero


@pytest.mark.parametrize("name", EF)
@pytest.mark.parametrize("V,k", [(1000, 7), (49152, 26), (128256, 26), (1000, 1000)])
def test_quantization_error_within_documented_bounds(name, V, k):
    codec = make_codec(name, k, V)
    full, ids, lp, res = _rows(V, k)
    d_ids, d_lp, d_res = codec.decode(codec.encode(ids, lp, res))
    g, n = codec.GAMMA, (1 << codec.value_bits) - 1
    true_d = full.gather(1, d_ids) - lp[:, :1]  # relative to the true top-1 (lp is sorted)
    dec_d = d_lp - d_lp[:, :1]  # decoded entries come sorted, top-1 first
    cells = 1 << codec.LO_BITS
    lo = (-codec.LO_RANGE * torch.ceil(-true_d.min(-1).values * cells / codec.LO_RANGE).clamp(1, cells)
          / cells).unsqueeze(-1)
    step = 1 - torch.exp(g * lo)
    y, y_hat = torch.exp(g * torch.maximum(true_d, lo)), torch.exp(g * dec_d)
    err = (y - y_hat).abs() / step * n  # in units of one code step
    near_top = y > 1 - step / (2 * n)
    near_top[:, 0] = False
    assert (err[:, 0] < 1e-4).all()
    assert (err[~near_top] <= 0.5 + 1e-3).all(), err[~near_top].max()
    assert (err[near_top] <= 1 + 1e-3).all()
    if k < V:
        sq, sq_hat = res.double().exp().sqrt(), d_res.double().exp().sqrt()
        assert ((sq - sq_hat).abs() <= 2.0 ** -(codec.RESIDUAL_BITS + 1) + 1e-6).all()


def test_more_value_bits_means_smaller_error():
    full, ids, lp, res = _rows(49152, 26)
    tvd = []
    for name in EF:
        codec = make_codec(name, 26, 49152)
        d_ids, d_lp, _ = codec.decode(codec.encode(ids, lp, res))
        tvd.append((full.gather(1, d_ids).exp() - d_lp.exp()).abs().sum(-1).mean().item())
    assert all(a > b for a, b in zip(tvd, tvd[1:])), tvd


@pytest.mark.parametrize("name", ["fp16", "ef6"])
def test_zero_rows(name):
    codec = make_codec(name, 4, 1000)
    rec = codec.encode(torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4), torch.zeros(0))
    assert rec.shape == (0, codec.record_bytes)
    ids, lp, res = codec.decode(rec)
    assert ids.shape == lp.shape == (0, 4) and res.shape == (0,)


@pytest.mark.parametrize("name", ["fp16", *EF])
def test_records_are_deterministic(name):
    codec = make_codec(name, 26, 49152)
    _, ids, lp, res = _rows(49152, 26)
    first = codec.encode(ids, lp, res)
    assert torch.equal(first, codec.encode(ids.clone(), lp.clone(), res.clone()))
    if name != "fp16":  # ef records hold a set: the input order does not matter
        perm = torch.argsort(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)), -1)
        perm[0] = torch.arange(26).flip(0)
        assert torch.equal(first, codec.encode(ids.gather(1, perm), lp.gather(1, perm), res))


def test_record_sizes_pinned():
    # docs/benchmarks.md and the recipe defaults quote these sizes.
    assert make_codec("default", 48, 49152).record_bytes == 64
    assert make_codec("hifi", 128, 49152).record_bytes == 198
    assert make_codec("default", 48, 128256).record_bytes == 64
    assert make_codec("ef6", 26, 128256).record_bytes == 68
    assert make_codec("fp16", 32, 49152).record_bytes == 130
    c = make_codec("ef6", 26, 49152)  # 10 + 6 + 26*6 + 26*10 + (26 + (49151 >> 10)) = 505 bits
    assert (c.low_bits, c.upper_bits, c.record_bits) == (10, 73, 505)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_describe_rebuilds_the_same_codec(name):
    # The trainer rebuilds the codec from the manifest: make_codec(desc["name"], desc["k"], desc["vocab_size"]).
    desc = make_codec(name, 26, 49152).describe()
    again = make_codec(desc["name"], desc["k"], desc["vocab_size"])
    assert again.describe() == desc and desc["record_bytes"] == again.record_bytes
    assert {"name", "k", "vocab_size", "record_bytes"} <= set(desc)


@pytest.mark.parametrize("name", ["fp16", *EF])
def test_bad_inputs_rejected(name):
    codec = make_codec(name, 5, 1000)
    _, ids, lp, res = _rows(1000, 5)
    for bad in (1000, 5000, -1):
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            codec.encode(torch.where(ids == ids[3, 2], torch.tensor(bad), ids), lp, res)
    with pytest.raises(ValueError, match="expected"):
        codec.encode(ids[:, :4], lp[:, :4], res)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(ids, torch.where(lp == lp[0, 1], torch.tensor(float("nan")), lp), res)
    with pytest.raises(ValueError, match="integers"):
        codec.encode(ids.float(), lp, res)


def test_ef_rejects_duplicates_and_corrupt_records():
    codec = make_codec("ef6", 5, 1000)
    _, ids, lp, res = _rows(1000, 5)
    dup = ids.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(dup, lp, res)
    rec = codec.encode(ids, lp, res)
    with pytest.raises(ValueError, match="expected records"):
        codec.decode(rec[:, :-1])
    upper_start = codec.record_bits - codec.upper_bits
    bad = rec.clone()
    bad[4, upper_start // 8 + 1] ^= 1  # one flipped bit in the Elias-Fano upper vector
    with pytest.raises(ValueError, match="corrupt"):
        codec.decode(bad)


def test_codec_parameters_validated():
    with pytest.raises(ValueError):
        EliasFanoCodec(k=0, vocab_size=10, value_bits=6, name="ef6")
    with pytest.raises(ValueError):
        EliasFanoCodec(k=11, vocab_size=10, value_bits=6, name="ef6")
    with pytest.raises(KeyError):
        make_codec("zip", 4, 10)


def _doc_decoder(name: str = "decode_ef"):
    text = (ROOT / "docs" / "cache_codec.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2, "docs/cache_codec.md should hold exactly two python blocks (ef, vk)"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/cache_codec.md", "exec"), scope)
    return scope[name]


@pytest.mark.parametrize("name", EF)
@pytest.mark.parametrize("V,k", [(49152, 26), (1000, 1000), (65537, 5), (128256, 1)])
def test_documented_numpy_decoder_matches(name, V, k):
    decode_ef = _doc_decoder()
    codec = make_codec(name, k, V)
    _, ids, lp, res = _rows(V, k)
    rec = codec.encode(ids, lp, res)
    n_ids, n_lp, n_res = decode_ef(rec.numpy(), codec.describe())
    d_ids, d_lp, d_res = codec.decode(rec)
    order = np.argsort(n_ids, axis=1)
    t_order = torch.argsort(d_ids, dim=-1)
    assert np.array_equal(np.take_along_axis(n_ids, order, 1), d_ids.gather(1, t_order).numpy())
    assert np.allclose(np.take_along_axis(n_lp, order, 1), d_lp.gather(1, t_order).numpy(), atol=1e-5)
    assert np.allclose(n_res, d_res.numpy(), atol=1e-6) or (k == V and np.isneginf(n_res).all())


def test_fp16_layout_is_plain_little_endian():
    codec = make_codec("fp16", 3, 70000)  # V > 65536: uint32 ids
    ids = torch.tensor([[69999, 0, 12345]])
    lp = torch.tensor([[-0.5, -1.5, -2.5]])
    res = torch.log1p(-lp.exp().sum(-1))
    rec = codec.encode(ids, lp, res).numpy()[0]
    assert np.array_equal(rec[:12].view("<u4"), [69999, 0, 12345])
    assert np.allclose(rec[12:18].view("<f2").astype(np.float32), lp.numpy()[0], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ef_on_gpu_matches_cpu():
    codec = make_codec("ef6", 26, 49152)
    _, ids, lp, res = _rows(49152, 26)
    cpu = codec.encode(ids, lp, res)
    gpu = codec.encode(ids.cuda(), lp.cuda(), res.cuda())
    # Identical except, rarely, one code off where exp/log round differently at a boundary.
    assert (cpu != gpu.cpu()).any(-1).float().mean() < 0.05
    g_ids, g_lp, g_res = codec.decode(gpu)
    c_ids, c_lp, c_res = codec.decode(gpu.cpu())
    assert torch.equal(g_ids.cpu(), c_ids) and torch.allclose(g_lp.cpu(), c_lp, atol=1e-5)


def test_bench_runs_on_a_tiny_model(tiny_world, tmp_path):
    spec = importlib.util.spec_from_file_location("codec_bench", ROOT / "bench" / "codec_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    results = bench.main(["--model", str(tiny_world["ta"]), "--texts", "2", "--max-length", "24", "--repeats", "1",
                          "--calib-texts", "2", "--settings", "fp16:4", "ef6:4", "ef4:4", "dk-bf16:4", "default:4",
                          "default:4:order", "--out", str(out)])
    assert [r["setting"] for r in results] == ["fp16:4", "ef6:4", "ef4:4", "dk-bf16:4", "default:4 (vk64)",
                                               "default:4:order (vk64)"]
    fp16, ef6, ef4, dk, vk, vk_order = results
    assert vk_order["kept"] == 4 and abs(vk_order["tvd"] - vk["tvd"]) < 1e-6  # all 4 fit: the same rows
    assert vk["kept"] == 4 and vk["bytes"] == 64
    assert fp16["tvd_bucket"] < ef6["tvd_bucket"] < ef4["tvd_bucket"]
    for r in results:
        assert 0 <= r["tvd_bucket"] <= r["tvd"] + 1e-6 <= 1 and r["kl_fwd"] >= -1e-6 and r["kl_rev"] >= -1e-6
        assert r["top1"] == 1.0 and 0 < r["mass"] < 1 and (r is dk or math.isfinite(r["decode_rows_s"]))
    # exact top-k: TVD with the tail zero-filled is exactly the residual mass
    assert abs(fp16["tvd_zero"] - (1 - fp16["mass"])) < 1e-3
    assert "| default:4 (vk64) | 4 | 4.0 | 64 |" in out.read_text()


# -- vk codecs: fixed-size records, a variable number of entries ----------------------------------

VK_SHAPES = [(2, 1), (3, 3), (1000, 7), (1000, 1000), (49152, 48), (49152, 128), (65537, 5), (128256, 48)]


def _vk_check(codec, full, ids, lp, res):
    """Decode and check the padded rows against "top-k_row + uniform tail"; returns k_row."""
    rec = codec.encode(ids, lp, res)
    assert rec.dtype == torch.uint8 and rec.shape == (len(ids), codec.record_bytes)
    d_ids, d_lp, d_res = codec.decode(rec)
    k, V = codec.k, codec.vocab_size
    assert d_ids.shape == d_lp.shape == (len(ids), k) and d_res.shape == (len(ids),)
    # Padding sits on the largest free ids, or with an id order the largest free ranks.
    pad_key = d_ids if codec.id_order is None else torch.from_numpy(np.argsort(np.asarray(codec.id_order)))[d_ids]
    k_row = codec.entries(rec)
    assert ((k_row >= 1) & (k_row <= k)).all()
    total = d_lp.double().exp().sum(-1) + d_res.double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    for i in range(len(ids)):
        n = int(k_row[i])
        # the stored entries are the n most probable ones, in rank order, top-1 first
        assert torch.equal(d_ids[i, :n].sort().values, full[i].topk(n).indices.sort().values)
        assert d_ids[i, 0] == full[i].argmax()
        assert len(set(d_ids[i].tolist())) == k  # padding ids distinct and not among the stored ones
        if n < k:
            assert (pad_key[i, n:] >= V - 2 * k).all()
            share = d_lp[i, n:].double().exp()
            r = share.sum() + d_res[i].double().exp()  # the residual R of the n stored entries
            assert torch.allclose(share, r / (V - n) * torch.ones_like(share), rtol=1e-5)
            assert torch.allclose(d_res[i].double().exp(), r * (V - k) / (V - n), rtol=1e-5, atol=1e-30)
    if k == V:
        assert torch.isneginf(d_res).all()
    return k_row


@pytest.mark.parametrize("name", VK)
@pytest.mark.parametrize("V,k", VK_SHAPES)
def test_vk_round_trip_padding_and_proper_distribution(name, V, k):
    codec = make_codec(name, k, V)
    full, ids, lp, res = _rows(V, k)
    k_row = _vk_check(codec, full, ids, lp, res)
    if k <= 7:
        assert (k_row == k).all()  # k_row = k edge: every entry fits, no padding


def test_vk_keeps_more_entries_of_peaked_low_id_rows_than_flat_ones():
    V, k = 49152, 64
    codec = make_codec("vk64", k, V)
    g = torch.Generator().manual_seed(0)
    low = torch.full((4, V), -30.0)
    low[:, :2000] = torch.randn(4, 2000, generator=g) * 3  # the mass on small ids, as in BPE vocabularies
    flat = torch.randn(4, V, generator=g) * 0.01  # near-uniform over all ids
    rows = torch.cat([low, flat])
    ids, lp, res = sparse_from_logits(rows, k)
    k_row = _vk_check(codec, torch.log_softmax(rows, -1), ids, lp, res)
    assert k_row[:4].min() > k_row[4:].max()


def test_vk_quantization_error_small():
    V, k = 49152, 48
    full, ids, lp, res = _rows(V, k)
    for name, bound in (("vk64", 0.01), ("vk198", 0.005)):
        codec = make_codec(name, k, V)
        rec = codec.encode(ids, lp, res)
        d_ids, d_lp, d_res = codec.decode(rec)
        n = codec.entries(rec)
        stored = torch.arange(k) < n[:, None]
        err = ((full.gather(1, d_ids).exp() - d_lp.exp()).abs() * stored).sum(-1)
        assert (err < bound).all(), err.max()
        # the residual is stored as in the ef codecs: within half a step in sqrt(R)
        r_true = (1 - (full.gather(1, d_ids).double().exp() * stored).sum(-1)).clamp(min=0)
        r_dec = (1 - (d_lp.double().exp() * stored).sum(-1)).clamp(min=0)
        assert ((r_true.sqrt() - r_dec.sqrt()).abs() <= 2.0 ** -11 + 1e-3).all()


@pytest.mark.parametrize("name", VK)
def test_vk_records_are_deterministic_and_order_free(name):
    codec = make_codec(name, 48, 49152)
    _, ids, lp, res = _rows(49152, 48)
    first = codec.encode(ids, lp, res)
    assert torch.equal(first, codec.encode(ids.clone(), lp.clone(), res.clone()))
    perm = torch.argsort(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)), -1)
    assert torch.equal(first, codec.encode(ids.gather(1, perm), lp.gather(1, perm), res))


def test_vk_bad_inputs_and_corrupt_records():
    codec = make_codec("vk64", 5, 1000)
    _, ids, lp, res = _rows(1000, 5)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        codec.encode(torch.where(ids == ids[3, 2], torch.tensor(1000), ids), lp, res)
    dup = ids.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(dup, lp, res)
    with pytest.raises(ValueError, match="expected"):
        codec.encode(ids[:, :4], lp[:, :4], res)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(ids, torch.where(lp == lp[0, 1], torch.tensor(float("nan")), lp), res)
    rec = codec.encode(ids, lp, res)
    with pytest.raises(ValueError, match="expected uint8 records"):
        codec.decode(rec[:, :-1])
    bad = rec.clone()
    bad[:, 2:] = 0  # no unary stream at all
    with pytest.raises(ValueError, match="corrupt"):
        codec.decode(bad)
    big = make_codec("vk64", 5, 49152)
    bad = big.encode(*_rows(49152, 5)[1:])
    bad[:, 2:] = 0xFF  # codes of 0 bits each: ids 0 repeated or out of range, steps below 0
    with pytest.raises(ValueError, match="corrupt"):
        big.decode(bad)


def test_vk_parameters_validated():
    with pytest.raises(ValueError, match="k <= vocab_size"):
        make_codec("vk64", 11, 10)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        make_codec("vk64", 4, (1 << 24) + 1)
    with pytest.raises(ValueError, match="cannot hold one entry"):
        VarKCodec(k=4, vocab_size=49152, budget=2, value_bits=7, name="vk2")
    with pytest.raises(ValueError, match="value_bits"):
        VarKCodec(k=4, vocab_size=49152, budget=64, value_bits=0, name="vk64")
    with pytest.raises(KeyError):
        make_codec("vk65", 4, 1000)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("name", VK)
@pytest.mark.parametrize("V,k", [(49152, 48), (1000, 1000), (65537, 5), (3, 3), (128256, 1)])
def test_documented_numpy_vk_decoder_matches(name, V, k, ordered):
    decode_vk = _doc_decoder("decode_vk")
    order = _random_order(V, 2) if ordered else None
    codec = make_codec(name, k, V, id_order=order)
    _, ids, lp, res = _rows(V, k)
    rec = codec.encode(ids, lp, res)
    n_ids, n_lp, n_res = decode_vk(rec.numpy(), codec.describe(), order)
    d_ids, d_lp, d_res = codec.decode(rec)
    assert np.array_equal(n_ids, d_ids.numpy())
    assert np.allclose(n_lp, d_lp.numpy(), atol=1e-5)
    assert np.allclose(n_res, d_res.numpy(), atol=1e-5) or (k == V and np.isneginf(n_res).all())


@pytest.mark.parametrize("V,k,m", [(49152, 48, 50), (1000, 7, 300), (7, 7, 5), (300, 1, 4)])
def test_sparse_from_logits_matches_float64_softmax(V, k, m):
    """Top-k in row blocks (50 rows at V = 49,152 cross block edges), residual to ~1e-7 absolute."""
    g = torch.Generator().manual_seed(V + k)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 40.0]).repeat(m // 5 + 1)[:m, None]
    logits = torch.randn(m, V, generator=g) * scale
    ids, lp, res = sparse_from_logits(logits, k)
    full = torch.log_softmax(logits.double(), -1)
    ref_lp, ref_ids = torch.topk(full, k, -1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    ref_res = full.scatter(-1, ref_ids, float("-inf")).logsumexp(-1)
    if k == V:
        assert torch.isneginf(res).all()
    else:
        assert ((res.double().exp() - ref_res.exp()).abs() <= 1e-6).all()
        assert (torch.isfinite(res) | (ref_res.exp() < 1e-6)).all()


# -- vk codecs with a teacher-calibrated id order ------------------------------------------------

def _random_order(V: int, seed: int = 0) -> np.ndarray:
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.int32)


@pytest.mark.parametrize("V,k", [(2, 1), (3, 3), (1000, 7), (1000, 1000), (49152, 48), (65537, 5)])
def test_vk_id_order_round_trip_padding_and_proper_distribution(V, k):
    codec = make_codec("vk64", k, V, id_order=_random_order(V))
    assert codec.describe()["layout"] == "variable-k-ordered-v1"
    full, ids, lp, res = _rows(V, k)
    _vk_check(codec, full, ids, lp, res)  # exact ids, proper rows, distinct padding outside the row


@pytest.mark.parametrize("name", VK)
def test_vk_random_order_decodes_the_same_distribution_as_no_order(name):
    """An order changes how ids are coded, not what is kept: rows that keep the same number of
    entries decode to the same {id: prob} and residual (padding ids differ, their share does not)."""
    V, k = 49152, 48
    _, ids, lp, res = _rows(V, k, 60)
    plain, ordered = make_codec(name, k, V), make_codec(name, k, V, id_order=_random_order(V, 1))
    r0, r1 = plain.encode(ids, lp, res), ordered.encode(ids, lp, res)
    n0, n1 = plain.entries(r0), ordered.entries(r1)
    (i0, l0, s0), (i1, l1, s1) = plain.decode(r0), ordered.decode(r1)
    same = (n0 == n1).nonzero().flatten().tolist()
    assert len(same) >= 10
    for r in same:
        n = int(n0[r])
        a, b = i0[r, :n].sort(), i1[r, :n].sort()
        assert torch.equal(a.values, b.values)
        assert torch.equal(l0[r, :n][a.indices], l1[r, :n][b.indices])
        assert torch.equal(l0[r, n:], l1[r, n:]) and s0[r] == s1[r]
        assert not set(i1[r, n:].tolist()) & set(i1[r, :n].tolist())


def test_vk_id_order_to_small_ranks_keeps_more_entries():
    # Rows whose mass sits on large ids: coded as raw ids they are expensive, as ranks cheap.
    V, k = 49152, 64
    g = torch.Generator().manual_seed(0)
    rows = torch.full((8, V), -30.0)
    rows[:, -2000:] = torch.randn(8, 2000, generator=g) * 3
    ids, lp, res = sparse_from_logits(rows, k)
    order = np.arange(V, dtype=np.int32)[::-1].copy()  # rank r = id V - 1 - r
    plain, ordered = make_codec("vk64", k, V), make_codec("vk64", k, V, id_order=order)
    assert (ordered.entries(ordered.encode(ids, lp, res)) > plain.entries(plain.encode(ids, lp, res))).all()


def test_id_order_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="only vk codecs"):
        make_codec("ef6", 4, 1000, id_order=_random_order(1000))
    with pytest.raises(ValueError, match="only vk codecs"):
        make_codec("fp16", 4, 1000, id_order=_random_order(1000))
    with pytest.raises(ValueError, match="permutation"):
        make_codec("vk64", 4, 1000, id_order=np.zeros(1000, np.int32))
    with pytest.raises(ValueError, match="permutation"):
        make_codec("vk64", 4, 1000, id_order=_random_order(999))


def test_codec_from_manifest_checks_the_id_order_file(tmp_path):
    from distill.files import write_npy_atomic
    from distill.cache.manifest import codec_from_manifest
    from distill.cache.codec_vk import order_from_counts
    from distill.errors import CacheError

    V = 1000
    order = order_from_counts(torch.randint(0, 5, (V,), generator=torch.Generator().manual_seed(0)))
    assert sorted(order.tolist()) == list(range(V))
    codec = make_codec("vk64", 7, V, id_order=order)
    rec = write_npy_atomic(tmp_path / "id_order.npy", order)
    desc = codec.describe()
    assert desc["id_order"] == {"file": "id_order.npy", "sha256": rec["sha256"]}  # describe() hashes the file bytes
    manifest = {"codec": desc}
    _, ids, lp, res = _rows(V, 7)
    again = codec_from_manifest(manifest, tmp_path)
    assert torch.equal(again.encode(ids, lp, res), codec.encode(ids, lp, res))
    assert codec_from_manifest({"codec": make_codec("vk64", 7, V).describe()}, tmp_path).id_order is None
    data = bytearray((tmp_path / "id_order.npy").read_bytes())
    data[-3] ^= 1
    (tmp_path / "id_order.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="id_order.npy: sha256 mismatch"):
        codec_from_manifest(manifest, tmp_path)
    with pytest.raises(CacheError, match="layout 'variable-k-v9'"):
        codec_from_manifest({"codec": desc | {"layout": "variable-k-v9"}}, tmp_path)
