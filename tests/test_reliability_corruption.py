"""Corruption of every artifact a run reads: each is named in one line, exit status 2, never a traceback.

One real capture on the tiny models; every case damages a copy of it (a flipped byte in a header or
in the data, a truncated or deleted file, a hand-edited manifest) and runs what users run:
`distill cache verify` (every hash) and `distill train` (which checks the cache before it loads a
model). Checkpoints and student folders are damaged the same way. docs/reliability.md lists them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_recipe
from distill.cache import manifest as mf
from distill.cache import store
from distill.cache.capture import run_capture
from distill.cli import main
from distill.config import load_recipe
from distill.errors import CacheError, DistillError

pytestmark = pytest.mark.usefixtures("one_thread")

CACHE_FILES = ["manifest.json", "id_order.npy", *(f"shard-00000/{f}" for f in mf.TOKEN_FILES),
               "shard-00001/teacher-ta.npy", "shard-00001/teacher-tb.npy"]


@pytest.fixture(scope="module")
def captured(tiny_world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    recipe = tiny_recipe(tiny_world, root / "run", train={"max_steps": 2, "batch_size": 4, "lr": 1e-3,
                                                         "save_every_steps": 1, "keep_last": 2})
    path = write_recipe(root / "r.yaml", recipe)
    run_capture(load_recipe(path))
    return {"root": root, "recipe": recipe, "cache": root / "run" / "cache"}


def _copy(captured: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh run directory holding a copy of the captured cache, and a recipe pointing at it."""
    run = tmp_path / "run"
    shutil.copytree(captured["cache"], run / "cache")
    recipe = dict(captured["recipe"], run_dir=str(run))
    return run, write_recipe(tmp_path / "r.yaml", recipe)


def _fails(argv: list[str], capsys, *names: str) -> str:
    """`distill ARGV` exits 2 with exactly one stderr line naming every one of `names`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert e.value.code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip_header":  # inside a .npy header (its dict starts at byte 10), or early in the JSON
        data[min(100, len(data) - 1) if path.suffix == ".json" else 20] ^= 0x01
    elif how == "flip_data":
        data[-1] ^= 0x01
    elif how == "truncate":
        data = data[:max(0, len(data) - 100)] if len(data) > 200 else data[:len(data) // 2]
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip_header", "flip_data", "truncate", "delete"])
@pytest.mark.parametrize("rel", CACHE_FILES)
def test_damaged_cache_file_is_named_by_verify_and_train(captured, tmp_path, capsys, rel, how):
    run, recipe = _copy(captured, tmp_path)
    target = run / "cache" / rel
    _damage(target, how)
    named = str(target) if rel != "manifest.json" or how != "delete" else str(run / "cache")
    _fails(["cache", "verify", str(run)], capsys, named)
    _fails(["train", str(recipe)], capsys, named)  # cache.verify: full, before any model loads
    assert not (run / "student").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("how", ["flip_header", "truncate", "delete"])
@pytest.mark.parametrize("rel", [f for f in CACHE_FILES if f.endswith(".npy")])
def test_fast_size_check_still_names_damaged_headers_and_sizes(captured, tmp_path, rel, how):
    """cache.verify=sizes skips the hashes; a damaged header or size is still named, not mis-read."""
    run, _ = _copy(captured, tmp_path)
    target = run / "cache" / rel
    _damage(target, how)
    with pytest.raises(CacheError, match=str(target)):
        store.CacheReader(run / "cache", verify="sizes").codec()


def _manifest_edits():
    def drop(*keys):
        def edit(m):
            node = m
            for k in keys[:-1]:
                node = node[k]
            del node[keys[-1]]
        return edit

    def put(value, *keys):
        def edit(m):
            node = m
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        return edit

    return {
        "drop_shards": (drop("shards"), "shards"),
        "shard_name_outside": (lambda m: m["shards"].__setitem__("../../escape", m["shards"].pop("shard-00000")),
                               "shards"),
        "unknown_file": (lambda m: m["shards"]["shard-00000"]["files"].__setitem__(
            "../../../etc/passwd", {"bytes": 1, "sha256": "0" * 64}), "../../../etc/passwd"),
        "bytes_as_text": (put("many", "shards", "shard-00000", "files", "input_ids.npy", "bytes"), "input_ids.npy"),
        "teacher_name_path": (put("../x", "teachers", 0, "name"), "teachers"),
        "samples_count": (lambda m: m["data"].__setitem__("samples", m["data"]["samples"] + 1), "data.samples"),
        "missing_file_entry": (drop("shards", "shard-00000", "files", "teacher-ta.npy"), "teacher-ta.npy"),
        "not_a_dict": (None, "manifest"),
    }


@pytest.mark.parametrize("case", list(_manifest_edits()))
def test_hand_edited_manifest_is_named(captured, tmp_path, capsys, case):
    """Edited with the checksum recomputed (a careful hand edit, or a tool): the structure and counts
    are checked; edited without it: the checksum names the file."""
    run, recipe = _copy(captured, tmp_path)
    path = run / "cache" / "manifest.json"
    edit, key = _manifest_edits()[case]
    m = mf.read_manifest(run / "cache")
    if edit is None:
        path.write_text("[1, 2, 3]\n")
    else:
        edit(m)
        mf.write_manifest(run / "cache", m)  # a valid checksum: only the structure can tell
    line = _fails(["cache", "verify", str(run)], capsys, str(path))
    assert key in line
    _fails(["train", str(recipe)], capsys, str(path))
    assert not (run.parent / "etc").exists()


def test_hand_edit_without_checksum_update_is_refused(captured, tmp_path, capsys):
    run, recipe = _copy(captured, tmp_path)
    path = run / "cache" / "manifest.json"
    m = json.loads(path.read_text())
    m["data"]["summary"] = "edited"  # any value, even one no check looks at
    path.write_text(json.dumps(m, indent=1, sort_keys=True))
    assert "checksum mismatch" in _fails(["cache", "verify", str(run)], capsys, str(path))


# ---------------------------------------------------------------- checkpoints and the student


@pytest.fixture(scope="module")
def trained(captured, tmp_path_factory) -> dict:
    """A finished tiny run: two checkpoints and a student."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    shutil.copytree(captured["cache"], run / "cache")
    recipe = dict(captured["recipe"], run_dir=str(run))
    path = write_recipe(root / "r.yaml", recipe)
    with pytest.raises(SystemExit) as e:
        main(["train", str(path)])
    assert e.value.code == 0
    return {"run": run, "recipe": recipe}


def _copy_run(trained: dict, tmp_path: Path, **changes) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    recipe = dict(trained["recipe"], run_dir=str(run))
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value}
    return run, write_recipe(tmp_path / "r.yaml", recipe)


@pytest.mark.parametrize("what", ["model.safetensors", "optimizer.bin", "trainer_state.json", "CHECKSUMS.json"])
@pytest.mark.parametrize("how", ["flip_data", "truncate", "delete"])
def test_damaged_checkpoint_is_named_on_resume(trained, tmp_path, capsys, what, how):
    run, recipe = _copy_run(trained, tmp_path)
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    target = last / what
    assert target.is_file(), sorted(p.name for p in last.iterdir())
    _damage(target, how)
    if what == "CHECKSUMS.json" and how == "delete":  # an unsealed folder: not a checkpoint; the one before is
        with pytest.raises(SystemExit) as e:
            main(["train", str(recipe), "--resume"])
        out = capsys.readouterr()
        assert e.value.code == 0 and "resumed from" in out.out and "step-00000001" in out.out, out.err[-2000:]
        return
    _fails(["train", str(recipe), "--resume"], capsys, str(target))


def test_checkpoint_from_another_recipe_is_refused_on_resume(trained, tmp_path, capsys):
    run, recipe = _copy_run(trained, tmp_path, train={"lr": 5e-4})
    line = _fails(["train", str(recipe), "--resume"], capsys, "train.lr")
    assert "another recipe" in line


def test_checkpoint_from_a_newer_step_count_resumes(trained, tmp_path, capsys):
    """What may change between a run and its resume (the budget, logging, max_steps) does not refuse it."""
    run, recipe = _copy_run(trained, tmp_path, train={"max_steps": 3, "log_every_steps": 2, "budget_minutes": 60})
    with pytest.raises(SystemExit) as e:
        main(["train", str(recipe), "--resume"])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert json.loads((run / "train_result.json").read_text())["steps"] == 3


@pytest.mark.parametrize("how", ["delete", "truncate", "flip_header", "missing_shard"])
def test_damaged_student_folder_is_named_when_loaded(trained, tmp_path, how):
    from transformers import AutoModelForCausalLM

    from distill.models import load_model

    run, _ = _copy_run(trained, tmp_path)
    student = run / "student"
    if how == "missing_shard":  # a sharded student (as a 7B one is) with one shard gone
        model = AutoModelForCausalLM.from_pretrained(student)
        (student / "model.safetensors").unlink()
        model.save_pretrained(student, max_shard_size="40KB")
        (student / "CHECKSUMS.json").unlink()  # resaved by hand: not distill's sealed folder any more
        shards = sorted(student.glob("model-*.safetensors"))
        assert len(shards) > 1
        shards[-1].unlink()
    else:
        _damage(student / "model.safetensors", how)
    with pytest.raises(DistillError, match=re.escape(str(student))):
        load_model(str(student), dtype=torch.float32, what="eval model")


@pytest.mark.parametrize("how", ["flip_data", "delete"])
def test_damaged_student_is_never_evaluated_or_published(trained, tmp_path, capsys, how):
    """A byte flipped in the student's weights loads without error in transformers; the student's
    CHECKSUMS.json (written when it was saved) names it, for `distill eval` and `distill publish`."""
    run, recipe = _copy_run(trained, tmp_path)
    target = run / "student" / "model.safetensors"
    _damage(target, how)
    _fails(["publish", str(recipe), "--dry-run"], capsys, str(target))
    assert not (run / "publish").exists()
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "1+1=", "target": "2"}) + "\n")
    (tmp_path / "inc.yaml").write_text("kind: generate_exact\ndataset: t.jsonl\nmax_new_tokens: 2\n")
    _fails(["eval", str(recipe), f"eval.tasks=[{tmp_path / 'inc.yaml'}]", "eval.teachers=false"], capsys,
           str(target))


def test_verified_stamp_rehashes_changed_files_and_cache_verify_ignores_it(captured, tmp_path, capsys):
    """`distill train` hashes a file again only when its size, mtime or inode changed since the last full
    check (.verified.json); `distill cache verify` hashes every file whatever the stamp says."""
    run, _ = _copy(captured, tmp_path)
    cache = run / "cache"
    store.CacheReader(cache, verify="full")  # hashes all, writes the stamp
    assert (cache / store.STAMP).is_file()
    target = cache / "shard-00001" / "teacher-ta.npy"
    before = target.stat()
    _damage(target, "flip_data")
    with pytest.raises(CacheError, match="sha256 mismatch"):  # changed stat: hashed again
        store.CacheReader(cache, verify="full")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # a change that hides from stat (bit rot)
    store.CacheReader(cache, verify="full")  # the stamp's limit, documented
    _fails(["cache", "verify", str(run)], capsys, str(target))


def test_fresh_start_refuses_to_drop_an_unfinished_run(trained, tmp_path, capsys):
    """`distill train` without --resume deletes the run's checkpoints: refused while they are those of a
    run that did not finish (a preempted job rerun without --resume); a finished run's are replaced."""
    run, recipe = _copy_run(trained, tmp_path)
    (run / "train_result.json").rename(run / "finished.json")  # as if killed before the end
    line = _fails(["train", str(recipe)], capsys, str(run), "--resume")
    assert "unfinished run" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001", "step-00000002"]
    (run / "finished.json").rename(run / "train_result.json")
    with pytest.raises(SystemExit) as e:
        main(["train", str(recipe)])
    out = capsys.readouterr()
    assert e.value.code == 0 and "removed the checkpoints of the finished earlier run" in out.out, out.err[-2000:]
