"""The teacher cache on tiny real models: content, resume, verification, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe, top_counts, write_recipe
from distill.files import sha256_file
from distill.cache import store
from distill.cache import manifest as mf
from distill.cache.capture import run_capture
from distill.cli import main
from distill.config import load_recipe
from distill.errors import CacheError, DistillError


def _capture(world, tmp_path, **sections):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(world, tmp_path / "run", **sections))
    recipe = load_recipe(path)
    return recipe, run_capture(recipe)


def _digest(cache_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(cache_dir)): sha256_file(p) for p in sorted(cache_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # .lock, .capture.lock


def test_cache_rows_match_teacher_logits(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    # fp16 codec: near-exact values, so the content check can be tight (codecs are tested in test_codec.py).
    recipe, report = _capture(tiny_world, tmp_path, cache={"top_k": 4, "batch_size": 8, "shard_tokens": 200,
                                                           "codec": "fp16"})
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    assert len(reader) == 40 and reader.teacher_names == ["ta", "tb"]
    assert len(reader.manifest["shards"]) > 1  # shard_tokens=200 splits the data
    m = reader.manifest
    codec = reader.codec()
    teachers = [AutoModelForCausalLM.from_pretrained(tiny_world[n]).eval() for n in ("ta", "tb")]
    for i in (0, 17, 39):
        s = reader.sample(i)
        ids = torch.from_numpy(s["input_ids"])[None]
        pos = np.flatnonzero(s["target_mask"]) - 1  # position t predicts token t+1
        assert s["records"].shape[:2] == (2, len(pos)) and len(pos) > 0
        for t, model in enumerate(teachers):
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, pos].float(), -1)
            got_ids, got_lp, got_res = codec.decode(torch.from_numpy(s["records"][t]))
            ref_lp, ref_ids = lp.topk(4, dim=-1)
            assert torch.equal(got_ids, ref_ids)
            assert torch.allclose(got_lp, ref_lp, atol=2e-3)
            rest = lp.scatter(-1, ref_ids, float("-inf")).logsumexp(-1)
            assert torch.allclose(got_res, rest, atol=2e-3)
    assert report.model_loads == 2 and report.rows == 2 * m["data"]["targets"]


def test_rerun_is_a_no_op_and_partial_capture_resumes_identically(tiny_world, tmp_path):
    recipe, first = _capture(tiny_world, tmp_path)
    cache_dir = Path(recipe.cache.dir)
    before = _digest(cache_dir)
    assert "id_order.npy" in before and "id_order_s" in first.extra  # default codec: a teacher id order
    again = run_capture(recipe)
    assert again.model_loads == 0 and _digest(cache_dir) == before and "id_order_s" not in again.extra
    # Simulate a capture killed after some files: drop a teacher file and its manifest entry.
    manifest = mf.read_manifest(cache_dir)
    shard = sorted(manifest["shards"])[1]
    del manifest["shards"][shard]["files"][mf.teacher_file("tb")]
    manifest["complete"] = False
    mf.write_manifest(cache_dir, manifest)
    (cache_dir / shard / mf.teacher_file("tb")).unlink()
    (cache_dir / shard / "junk.npy.tmp123").write_bytes(b"half-written")
    with pytest.raises(CacheError, match="incomplete"):
        store.CacheReader(cache_dir)
    resumed = run_capture(recipe)
    assert resumed.model_loads == 1  # only tb's group had work left
    assert "id_order_s" not in resumed.extra  # the saved order is reused, never recomputed
    assert _digest(cache_dir) == before


def _flip_byte_and_verify(target: Path, run: Path, capsys) -> bytearray:
    """Flip one byte of `target`; `distill cache verify` must exit 2 naming the file. Returns the new bytes."""
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["cache", "verify", str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(target) in err and "sha256" in err
    return data


def test_flipped_byte_is_detected_and_named(tiny_world, tmp_path, capsys):
    recipe, _ = _capture(tiny_world, tmp_path)
    cache_dir = Path(recipe.cache.dir)
    target = sorted(cache_dir.glob("shard-*/teacher-ta.npy"))[0]
    data = _flip_byte_and_verify(target, tmp_path / "run", capsys)
    target.write_bytes(bytes(data[:-7]))  # truncated: caught even by the fast size check
    with pytest.raises(CacheError, match="teacher-ta.npy: size"):
        store.CacheReader(cache_dir)


def test_flipped_byte_in_id_order_is_detected_and_named(tiny_world, tmp_path, capsys):
    # A wrong order decodes every row to plausible wrong ids, so every reader checks its hash.
    recipe, _ = _capture(tiny_world, tmp_path)
    cache_dir = Path(recipe.cache.dir)
    target = cache_dir / "id_order.npy"
    reader = store.CacheReader(cache_dir)
    assert reader.codec().describe()["layout"] == "variable-k-ordered-v1"
    _flip_byte_and_verify(target, tmp_path / "run", capsys)
    with pytest.raises(CacheError, match="id_order.npy: sha256 mismatch"):
        reader.codec()


def test_changed_recipe_is_refused_unless_rebuild(tiny_world, tmp_path):
    recipe, _ = _capture(tiny_world, tmp_path)
    changed = write_recipe(tmp_path / "r2.yaml", tiny_recipe(tiny_world, tmp_path / "run",
                                                             cache={"top_k": 3, "shard_tokens": 200}))
    with pytest.raises(CacheError, match="different codec"):
        run_capture(load_recipe(changed))
    with pytest.raises(CacheError, match="different codec"):  # the id order setting is part of the recipe
        run_capture(load_recipe(write_recipe(tmp_path / "r3.yaml", tiny_recipe(
            tiny_world, tmp_path / "run", cache={"top_k": 4, "shard_tokens": 200, "id_order": "none"}))))
    rebuilt = run_capture(load_recipe(changed, ["cache.rebuild=true"]))
    assert rebuilt.model_loads == 2
    assert mf.read_manifest(Path(recipe.cache.dir))["codec"]["k"] == 3


def test_teacher_with_other_tokenizer_is_refused_before_loading(tiny_world, tmp_path):
    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_world["ta"], other)
    tok = tiny_world["tok"]
    tok2 = type(tok).from_pretrained(tiny_world["ta"])
    tok2.add_tokens(["<extra>"])
    tok2.save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"not weights: loading them would fail loudly")
    recipe = tiny_recipe(tiny_world, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(other)
    with pytest.raises(DistillError, match=r"teachers\[1\] \(tb\): its tokenizer differs"):
        run_capture(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert not (tmp_path / "run" / "cache").exists()


def test_manifest_documents_itself(tiny_world, tmp_path):
    recipe, _ = _capture(tiny_world, tmp_path)
    m = json.loads((Path(recipe.cache.dir) / "manifest.json").read_text())
    # v2: the default (vk) codec codes ids as ranks in a teacher order, which v1 readers cannot decode.
    assert m["format"] == "distill-cache" and m["version"] == 2 and m["complete"]
    order = m["codec"]["id_order"]
    assert m["codec"]["layout"] == "variable-k-ordered-v1" and order["file"] == "id_order.npy"
    assert order["teacher"] == "ta" and order["samples"] == 40 and order["top"] == 128
    ids = np.load(Path(recipe.cache.dir) / "id_order.npy")
    assert ids.dtype == np.int32 and sorted(ids.tolist()) == list(range(m["codec"]["vocab_size"]))
    assert order["sha256"] == sha256_file(Path(recipe.cache.dir) / "id_order.npy")
    assert [t["name"] for t in m["teachers"]] == ["ta", "tb"] and m["domains"] == ["add", "rev"]
    assert m["tokenizer"]["fingerprint"] and m["data"]["fingerprint"]
    for entry in m["shards"].values():
        assert set(entry["files"]) == set(mf.expected_files(m))
        assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in entry["files"].values())


def test_ordered_cache_decodes_the_teachers_ids(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe, _ = _capture(tiny_world, tmp_path)
    reader = store.CacheReader(recipe.cache.dir, verify="full")
    codec = reader.codec()
    ta = AutoModelForCausalLM.from_pretrained(tiny_world["ta"]).eval()
    checked = 0
    for i in (0, 17, 39):
        s = reader.sample(i)
        pos = np.flatnonzero(s["target_mask"]) - 1
        with torch.no_grad():
            lp = torch.log_softmax(ta(torch.from_numpy(s["input_ids"])[None]).logits[0, pos].float(), -1)
        records = torch.from_numpy(s["records"][0])
        got_ids, _, _ = codec.decode(records)
        kept = codec.entries(records)
        ref = lp.topk(4, dim=-1).indices
        for r in range(len(pos)):
            n = int(kept[r])
            # Stored entries are the teacher's top ids (ties aside, in rank order).
            assert set(got_ids[r, :n].tolist()) <= set(ref[r].tolist()) and got_ids[r, 0] == ref[r, 0]
            checked += n
    assert checked > 0


def test_id_order_follows_the_first_teachers_top_ids(tiny_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from distill.cache import codec_vk

    # The tiny vocabulary (42) is inside any top-128, which would make every order the identity.
    monkeypatch.setattr(codec_vk, "ID_ORDER_TOP", 3)
    recipe, _ = _capture(tiny_world, tmp_path)
    reader = store.CacheReader(recipe.cache.dir)
    assert reader.manifest["codec"]["id_order"]["top"] == 3
    order = np.load(Path(recipe.cache.dir) / "id_order.npy")
    counts = top_counts(AutoModelForCausalLM.from_pretrained(tiny_world["ta"]).eval(), reader, 3)
    ranked = counts[torch.from_numpy(order).long()]
    # Non-increasing counts along the order, up to a row or two of fp32 near-ties between batched and
    # unbatched forwards; ties by ascending id.
    assert (ranked[1:] <= ranked[:-1] + 2).all() and ranked[0] == counts.max()
    assert not np.array_equal(order, np.arange(len(order)))
