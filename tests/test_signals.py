"""Teachers behind one interface: a live teacher yields exactly what its cache records hold,
and a recipe mixing cached and online teachers trains like the all-cached one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill import batches as B
from distill.cache.capture import run_capture
from distill.cache.store import CacheReader
from distill.cache.teachers import load_group
from distill.config import load_recipe
from distill.errors import DistillError
from distill.signals import CachedTeachers, LiveTeacher
from distill.train import run_train


def _recipe(world, tmp_path: Path, name: str, overrides=()):
    # Batches of one sample, in capture and in training: the teacher then runs on the same
    # [1, T] inputs in both, so its signal must agree bit for bit.
    path = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(
        world, tmp_path / name, cache={"top_k": 4, "batch_size": 1, "shard_tokens": 200},
        train={"max_steps": 5, "batch_size": 1, "lr": 1e-2, "schedule": "constant", "log_every_steps": 1}))
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize("codec", ["default", "fp16"])
def test_live_teacher_equals_its_cache_records(tiny_world, tmp_path, codec):
    recipe = _recipe(tiny_world, tmp_path, "run", [f"cache.codec={codec}"])
    run_capture(recipe)
    reader = CacheReader(recipe.cache.dir)
    codec_ = reader.codec()
    cached = CachedTeachers(codec_, reader.cached_names)
    live = [LiveTeacher(load_group([t], recipe, "cpu"), t, codec_) for t in recipe.teachers]
    assert len(reader) == 40
    for i in range(len(reader)):
        batch = B.collate([reader.sample(i)], 0)
        want = cached.signal(batch, "cpu")
        for j, teacher in enumerate(live):
            got = teacher.signal(batch, "cpu")
            assert got.ids.shape == (1, int(batch["select"].sum()), codec_.k)
            assert torch.equal(got.ids[0], want.ids[j]), i
            assert torch.equal(got.logprobs[0], want.logprobs[j]), i
            assert torch.equal(got.log_residual[0], want.log_residual[j]), i


def test_mixed_cached_and_online_teachers_train_like_the_cached_run(tiny_world, tmp_path):
    """tb online, ta cached: the cache holds no records of tb, and the student ends bit for bit
    where the all-cached run's does (same signal through the same step)."""
    from safetensors.torch import load_file

    cached = _recipe(tiny_world, tmp_path, "cached")
    run_capture(cached)
    run_train(cached)
    mixed = _recipe(tiny_world, tmp_path, "mixed", ["teachers.1.online=true"])
    run_capture(mixed)
    reader = CacheReader(mixed.cache.dir)
    assert reader.cached_names == ["ta"] and reader.teacher_names == ["ta", "tb"]
    assert not list(Path(mixed.cache.dir).glob("*/teacher-tb.npy")) and list(Path(mixed.cache.dir).glob("*/teacher-ta.npy"))
    assert run_train(mixed).steps == 5
    a = load_file(Path(cached.run_dir) / "student" / "model.safetensors")
    b = load_file(Path(mixed.run_dir) / "student" / "model.safetensors")
    base = load_file(Path(tiny_world["base"]) / "model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_online_flag_must_match_the_cache(tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path, "run")
    run_capture(recipe)
    online = _recipe(tiny_world, tmp_path, "run", ["train.online_teachers=true"])
    assert all(t.online for t in online.teachers)
    with pytest.raises(DistillError, match=r"teachers\[0\]\.online: cache has None, recipe has True"):
        run_train(online)


def test_all_online_teachers_train_with_loader_workers_on_cpu(tiny_world, tmp_path):
    """With every teacher online the cache holds no records; a loader worker (which decodes
    records on CPU) must not try to decode the empty stack (vk codecs cannot reshape 0 rows)."""
    recipe = _recipe(tiny_world, tmp_path, "online", ["train.online_teachers=true", "train.num_workers=1",
                                                       "train.max_steps=2"])
    run_capture(recipe)
    assert CacheReader(recipe.cache.dir).cached_names == []
    assert run_train(recipe).steps == 2
