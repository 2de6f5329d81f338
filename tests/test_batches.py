"""Batch plans (order, length grouping, resume position) and the DataLoader over the cache."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill import batches as B
from distill.cache.capture import run_capture
from distill.cache.store import CacheReader
from distill.config import load_recipe


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 400, size=n)


def test_plan_is_a_seeded_permutation_cut_into_global_batches():
    plan = B.epoch_plan(103, batch_size=4, world=2, seed=7, epoch=3)
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3)).tolist()
    assert plan.global_batches == [perm[i:i + 8] for i in range(0, 96, 8)]
    assert plan.local(1, 0) == perm[8:12] and plan.local(1, 1) == perm[12:16]
    assert B.epoch_plan(103, 4, 2, 7, 4).global_batches != plan.global_batches


@pytest.mark.parametrize(("group_batches", "most"), [(1, 0.7), (3, 0.35), (50, 0.05)])
def test_length_grouping_keeps_samples_and_batch_sizes_and_cuts_padding(group_batches, most):
    lengths = _lengths(1003)
    plain = B.epoch_plan(1003, batch_size=4, world=2, seed=1, epoch=0)
    grouped = B.epoch_plan(1003, batch_size=4, world=2, seed=1, epoch=0, lengths=lengths,
                           group_batches=group_batches)
    again = B.epoch_plan(1003, batch_size=4, world=2, seed=1, epoch=0, lengths=lengths, group_batches=group_batches)
    assert grouped.global_batches == again.global_batches  # a pure function of the seed
    assert len(grouped.global_batches) == len(plain.global_batches) == 125
    assert all(len(b) == 8 for b in grouped.global_batches)
    # The same samples (the same random ragged tail is dropped), each once.
    assert sorted(sum(grouped.global_batches, [])) == sorted(sum(plain.global_batches, []))
    before, after = B.padding_fraction(plain, lengths), B.padding_fraction(grouped, lengths)
    assert before > 0.3 and after < most * before, (before, after)  # wider windows, less padding
    # Batch order is shuffled, not sorted by length.
    longest = [int(lengths[b].max()) for b in grouped.global_batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_padding_fraction_counts_each_rank_separately():
    lengths = np.array([1, 3, 2, 2])
    plan = B.Plan([[0, 1, 2, 3]], world=2)  # rank 0 pads [1, 3] to 3, rank 1 has none
    assert B.padding_fraction(plan, lengths) == pytest.approx(2 / 10)
    assert B.padding_fraction(B.Plan([], 1), lengths) == 0.0


def test_sampler_resumes_from_any_micro_batch_across_epochs():
    lengths = _lengths(50)
    args = (50, 3, 2, 5)  # n, batch, world, seed: 8 micro-batches an epoch, 2 dropped
    whole = list(B.MicroBatchSampler(B.PlanCache(*args, 8, lengths=lengths, group_batches=2), 1, 0, 30))
    assert len(whole) == 30 and all(len(b) == 3 for b in whole)
    for start in (0, 7, 8, 13, 29):
        tail = B.MicroBatchSampler(B.PlanCache(*args, 8, lengths=lengths, group_batches=2), 1, start, 30)
        assert len(tail) == 30 - start and list(tail) == whole[start:]
    # Rank 1's lists are the second halves of the normaliser's global batches.
    plans = B.PlanCache(*args, 8, lengths=lengths, group_batches=2)
    assert [plans.batch(m)[3:] for m in range(30)] == whole


@pytest.fixture(scope="module")
def cache_dir(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batches")
    recipe = load_recipe(write_recipe(tmp / "r.yaml", tiny_recipe(tiny_world, tmp / "run")))
    run_capture(recipe)
    return recipe.cache.dir


def test_dataset_pickles_as_a_path_and_reopens_its_maps(cache_dir):
    ds = B.CacheDataset(CacheReader(cache_dir))
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # not a copy of the memory-mapped arrays
    copy = pickle.loads(blob)
    assert len(copy) == len(ds) > 0
    for i in (0, len(ds) - 1):
        a, b = ds[i], copy[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert copy.reader is not ds.reader


def _batches(loader) -> list[dict]:
    return [dict(b) for b in loader]


def test_loader_with_workers_equals_in_process_reads(cache_dir):
    """Same batches, same order, with 0 or 2 workers, decoding in the workers or not."""
    reader = CacheReader(cache_dir)
    ds = B.CacheDataset(reader)
    codec = reader.codec()  # from the manifest, id order included (pickled to the workers)
    plans = lambda: B.PlanCache(len(ds), 2, 2, 0, len(ds) // 4, lengths=reader.lengths())  # noqa: E731
    expect = [B.collate([ds[i] for i in plans().local(mi, 1)], pad_id=0) for mi in range(3, 25)]
    for workers, dec in [(0, None), (2, None), (2, codec)]:
        got = _batches(B.make_loader(ds, B.MicroBatchSampler(plans(), 1, 3, 25), 0, workers=workers, codec=dec))
        assert len(got) == len(expect) == 22
        for g, e in zip(got, expect):
            if dec is not None:
                s = B.decode_signal(codec, e["records"])
                assert all(torch.equal(x, y) for x, y in zip(g.pop("signal"), (s.ids, s.logprobs, s.log_residual)))
                e = {k: v for k, v in e.items() if k != "records"}
            assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in e), workers


def test_loader_leaves_the_global_rng_alone(cache_dir):
    ds = B.CacheDataset(CacheReader(cache_dir))
    torch.manual_seed(0)
    expect = torch.rand(3)
    torch.manual_seed(0)
    next(iter(B.make_loader(ds, B.MicroBatchSampler(B.PlanCache(len(ds), 2, 1, 0, 10), 0, 0, 2), 0)))
    assert torch.equal(torch.rand(3), expect)


@pytest.mark.slow
def test_loader_bench_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "loader_bench.py"), "--rounds", "1", "--steps", "1",
                          "--samples", "16", "--min-len", "8", "--max-len", "32", "--hidden", "32", "--layers", "1",
                          "--workers", "0", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 0 |") or ln.startswith("| 1 |")]
    assert len(rows) == 3 and "padding" in out.stdout, out.stdout
