"""The cache manifest (`<cache>/manifest.json`): the one module that builds, reads, updates and checks it.

    {"format": "distill-cache", "version": 1 | 2, "complete": bool,
     "tokenizer": {"fingerprint", "source"},
     "teachers":  [teacher_record(t) per teacher, recipe order],
     "codec":     codec.describe() (+ the id order's settings and file record, vk with an id order),
     "data":      {"sources": [each source's settings + "sha256" of its file], "max_length", "mask",
                   "seed", "fingerprint" (of the tokens), "samples", "tokens", "targets", "summary",
                   "generation" (prompt-only sources)},
     "domains":   [routing tags, sorted],
     "shards":    {"shard-00000": {"samples": [a, b], "tokens", "rows", "files": {name: {"bytes", "sha256"}}}}}

A cache's identity has two parts. The recipe part (`recipe_record`) is what the recipe says and
can be checked without reading the data: teachers, tokenizer fingerprint, codec, and the data
settings with every local source file's sha256. The token part is what capture derives from
the data: the token fingerprint, counts, domains and shard plan. `distill cache` compares both
with what it would write (`open_or_create`); `distill train` compares the recipe part
(`check_recipe`), in seconds, before any weights load. Both report the first difference by
name, e.g. `teachers[1].revision: cache has 'abc', recipe has 'def'`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from distill.cache import codec_vk
from distill.cache.codec import Codec, make_codec
from distill.config import DataConfig, Recipe, TeacherConfig
from distill.errors import CacheError, DistillError
from distill.files import sha256_file, write_json_atomic
from distill.schema import to_dict

FORMAT = "distill-cache"
VERSION = 1
# A cache whose vk records code ids as ranks in a stored id order (codec.id_order) is written as v2,
# so that a reader from before id orders refuses it instead of decoding ranks as ids.
ORDERED_VERSION = 2
READABLE_VERSIONS = (VERSION, ORDERED_VERSION)
NAME = "manifest.json"
TOKEN_FILES = ("input_ids.npy", "target_mask.npy", "sample_offsets.npy", "row_offsets.npy", "domains.npy")
REBUILD = "rerun `distill cache` with cache.rebuild=true"


# ---------------------------------------------------------------- teachers and files


def teacher_record(t: TeacherConfig) -> dict:
    """What identifies a teacher's outputs. `"online": true` marks a teacher whose records the
    cache does not hold (train runs it live); absent otherwise, so caches written before online
    teachers existed keep their identity."""
    return {"name": t.name, "model": t.model, "revision": t.revision, "adapter": t.adapter,
            "gguf_file": t.gguf_file, "dtype": t.dtype, "quantization": t.quantization} \
        | ({"online": True} if t.online else {})


def cached_teachers(manifest: dict) -> list[str]:
    """Names of the teachers that have a file in every shard (online teachers have none), manifest order."""
    return [t["name"] for t in manifest["teachers"] if not t.get("online", False)]


def teacher_file(name: str) -> str:
    return f"teacher-{name}.npy"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def expected_files(manifest: dict) -> list[str]:
    return list(TOKEN_FILES) + [teacher_file(name) for name in cached_teachers(manifest)]


def is_shard_complete(manifest: dict, shard: str) -> bool:
    files = manifest["shards"][shard]["files"]
    return all(f in files for f in expected_files(manifest))


# ---------------------------------------------------------------- reading and updating


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / NAME
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no cache here (manifest.json missing); run `distill cache` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"{path}: manifest is not valid JSON (corrupt cache; rerun `distill cache`)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") not in READABLE_VERSIONS:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise CacheError(f"{path}: not a {FORMAT} v{'/v'.join(map(str, READABLE_VERSIONS))} manifest "
                         f"(found {found[0]!r} v{found[1]!r})")
    # caches written before the checksum existed have none, and are still read
    if "checksum" in manifest and manifest["checksum"] != _checksum(manifest):
        raise CacheError(f"{path}: checksum mismatch: the manifest was edited or is corrupt; {REBUILD}")
    manifest.pop("checksum", None)
    problem = _structure_problem(manifest)
    if problem:
        raise CacheError(f"{path}: malformed manifest (edited by hand?): {problem}; {REBUILD}")
    return manifest


_SHARD = re.compile(r"shard-\d{5,}")
_NAME = re.compile(r"[\w-]+")  # a teacher name, as the recipe loader allows
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _structure_problem(m: dict) -> str | None:
    """The first key of `m` whose type or form is not what capture writes (None when all are).

    Every key that a reader indexes or turns into a path is checked here, so that a manifest edited
    by hand gives one line naming the key, not a KeyError, and cannot point a reader outside the
    cache (shard and file names are fixed patterns)."""
    def bad(key: str, ok: bool, want: str) -> str | None:
        return None if ok else f"{key}: expected {want}"

    checks = [
        ("complete", lambda: isinstance(m["complete"], bool), "true or false"),
        ("teachers", lambda: isinstance(m["teachers"], list) and m["teachers"] and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and _NAME.fullmatch(t["name"])
            for t in m["teachers"]), "a list of {name: ...} records with plain names"),
        ("domains", lambda: isinstance(m["domains"], list) and all(isinstance(d, str) for d in m["domains"]),
         "a list of strings"),
        ("codec", lambda: isinstance(m["codec"], dict) and isinstance(m["codec"].get("name"), str)
         and all(isinstance(m["codec"].get(k), int) and m["codec"][k] > 0 for k in ("k", "vocab_size", "record_bytes")),
         "{name, k, vocab_size, record_bytes > 0}"),
        ("data", lambda: isinstance(m["data"], dict) and all(isinstance(m["data"].get(k), int) and m["data"][k] >= 0
                                                             for k in ("samples", "targets")),
         "{samples, targets: counts}"),
        ("shards", lambda: isinstance(m["shards"], dict) and all(
            _SHARD.fullmatch(name) and isinstance(e, dict) and isinstance(e.get("files"), dict)
            for name, e in m["shards"].items()), '{"shard-NNNNN": {"files": {...}}}'),
    ]
    for key, check, want in checks:
        try:
            ok = bool(check())
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            return bad(key, False, want)
    allowed = set(expected_files(m))
    for shard, entry in m["shards"].items():
        for fname, rec in entry["files"].items():
            key = f"shards.{shard}.files.{fname}"
            if fname not in allowed:
                return f"{key}: not a file of this cache (expected one of {sorted(allowed)})"
            if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and rec["bytes"] >= 0
                    and isinstance(rec.get("sha256"), str) and _HEX64.fullmatch(rec["sha256"])):
                return f"{key}: expected {{bytes: int, sha256: 64 hex digits}}"
    order = m["codec"].get("id_order")
    if order is not None and not (isinstance(order, dict) and order.get("file") == codec_vk.ID_ORDER_FILE):
        return f"codec.id_order.file: expected {codec_vk.ID_ORDER_FILE!r}"
    return None


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Write the manifest atomically with a `checksum` of the rest of it, so that a byte flipped in
    a value (still valid JSON) or a hand edit is refused instead of trusted."""
    manifest.pop("checksum", None)
    write_json_atomic(Path(cache_dir) / NAME, manifest | {"checksum": _checksum(manifest)})


@contextmanager
def locked(cache_dir: Path):
    """Serialise manifest updates between processes capturing into the same cache."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def capture_lock_path(cache_dir: Path) -> Path:
    """`<parent>/.<cache name>.capture.lock`: beside the cache, so that a capture refused before it
    writes anything (bad data, a busy cache) leaves no cache directory behind."""
    cache_dir = Path(cache_dir)
    return cache_dir.parent / f".{cache_dir.name}.capture.lock"


@contextmanager
def capture_lock(cache_dir: Path):
    """Held by the main process of a capture for all of it: a second `distill cache` on the same
    cache directory (another shell, a retried job) refuses at once instead of racing the first one
    for the same shards. The lock is the kernel's (flock), so a killed capture never leaves it held."""
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(capture_lock_path(cache_dir), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise CacheError(f"{cache_dir}: another `distill cache` (pid {holder}) is capturing into this cache; "
                             "wait for it to finish, or stop it and rerun (a capture resumes)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update(cache_dir: Path, change: Callable[[dict], None]) -> dict:
    """Read, change in place and rewrite the manifest under the lock; returns the new manifest."""
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        change(manifest)
        write_manifest(cache_dir, manifest)
    return manifest


def record_file(cache_dir: Path, shard: str, fname: str, record: dict) -> None:
    """Add one completed file to the manifest."""
    def change(m: dict) -> None:
        m["shards"][shard]["files"][fname] = record
        m["complete"] = all(is_shard_complete(m, s) for s in m["shards"])

    update(cache_dir, change)


def record_id_order(cache_dir: Path, record: dict) -> None:
    """Add the id order file's {"bytes", "sha256"} to the codec entry."""
    update(cache_dir, lambda m: m["codec"]["id_order"].update(record))


def stored_generation_meta(cache_dir: Path) -> dict | None:
    """The generated responses' meta a cache was made with (None when it had none)."""
    return read_manifest(cache_dir)["data"].get("generation", {}).get("meta")


# ---------------------------------------------------------------- the codec part


def codec_record(recipe: Recipe, vocab_size: int, n_samples: int) -> dict:
    """The manifest's codec entry for this recipe, before the id order file exists."""
    c = recipe.cache
    # A top_k above the vocabulary (a toy vocabulary) keeps every token.
    codec = make_codec(c.codec, min(c.top_k, vocab_size), vocab_size).describe()
    if c.id_order == "teacher":
        codec |= {"layout": codec_vk.ORDERED_LAYOUT, "padding": "largest-free-ranks",
                  "id_order": {"file": codec_vk.ID_ORDER_FILE, "source": "teacher", "teacher": recipe.teachers[0].name,
                               "samples": min(c.id_order_rows, n_samples), "top": codec_vk.ID_ORDER_TOP}}
    return codec


def codec_from_manifest(manifest: dict, cache_dir) -> Codec:
    """The codec a cache was written with, built from its manifest (never from the recipe).

    An ordered vk cache names its id order file and sha256 under codec.id_order; the file is
    loaded and its hash checked, so a stale or corrupt order (which would decode every row to
    wrong ids without any error) is refused, naming the file."""
    c = manifest["codec"]
    layout = c.get("layout")
    if layout not in (None, codec_vk.LAYOUT, codec_vk.ORDERED_LAYOUT, "elias-fano-v1"):
        raise CacheError(f"{cache_dir}: codec layout {layout!r} is unknown to this version of distill")
    if layout != codec_vk.ORDERED_LAYOUT:
        return make_codec(c["name"], c["k"], c["vocab_size"])
    rec = c.get("id_order") or {}
    if not rec.get("sha256"):
        raise CacheError(f"{cache_dir}: the manifest has no id order hash (capture interrupted before the "
                         "order was written?); rerun `distill cache`")
    path = Path(cache_dir) / rec["file"]
    if not path.is_file():
        raise CacheError(f"{path}: missing id order file")
    if sha256_file(path) != rec["sha256"]:
        raise CacheError(f"{path}: sha256 mismatch (corrupt or replaced id order file)")
    order = np.load(path, allow_pickle=False)
    try:
        return make_codec(c["name"], c["k"], c["vocab_size"], id_order=order)
    except ValueError as exc:
        raise CacheError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- building


def data_fingerprint(samples: list, domains: list[str]) -> str:
    """sha256 of the token stream: every sample's ids, target mask and domain tag."""
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s.input_ids, dtype=np.int32).tobytes())
        h.update(np.asarray(s.target_mask, dtype=np.uint8).tobytes())
        h.update((s.domain or "").encode() + b"\0")
    return h.hexdigest()


def data_record(cfg: DataConfig) -> dict:
    """The data settings the samples are made from, with the sha256 of each local source file
    (None for a Hub dataset: its id, config and split are what is recorded)."""
    sources = []
    for src in cfg.sources:
        path = Path(src.path).expanduser()  # local-or-Hub exactly as distill/data.py reads it
        sources.append(to_dict(src) | {"sha256": sha256_file(path) if path.is_file() else None})
    return {"sources": sources, "max_length": cfg.max_length, "mask": cfg.mask, "seed": cfg.seed}


def recipe_record(recipe: Recipe, tok_fp: str, vocab_size: int, n_samples: int) -> dict:
    """The recipe part of the identity, in the order differences are reported."""
    return {"teachers": [teacher_record(t) for t in recipe.teachers], "tokenizer": {"fingerprint": tok_fp},
            "data": data_record(recipe.data), "codec": codec_record(recipe, vocab_size, n_samples)}


def new_manifest(recipe: Recipe, tok_fp: str, samples: list, domains: list[str], plan: list[tuple[int, int]],
                 vocab_size: int, summary: str, generation: dict | None = None) -> dict:
    part = recipe_record(recipe, tok_fp, vocab_size, len(samples))
    shards = {}
    for i, (a, b) in enumerate(plan):
        shards[shard_name(i)] = {"samples": [a, b], "tokens": sum(len(s.input_ids) for s in samples[a:b]),
                                 "rows": sum(sum(s.target_mask) for s in samples[a:b]), "files": {}}
    data = part["data"] | {"fingerprint": data_fingerprint(samples, domains), "samples": len(samples),
                           "tokens": sum(len(s.input_ids) for s in samples),
                           "targets": sum(sum(s.target_mask) for s in samples), "summary": summary}
    ordered = recipe.cache.id_order == "teacher"
    return {
        "format": FORMAT, "version": ORDERED_VERSION if ordered else VERSION,
        "tokenizer": part["tokenizer"] | {"source": recipe.tokenizer or recipe.student.model},
        "data": data | ({"generation": generation} if generation else {}),
        "codec": part["codec"], "teachers": part["teachers"], "domains": domains, "shards": shards,
        "complete": False,
    }


# ---------------------------------------------------------------- identity


def recipe_part(m: dict) -> dict:
    """The fields of manifest `m` that `recipe_record` makes (a missing one is None: an older cache)."""
    codec = dict(m.get("codec") or {})
    if isinstance(codec.get("id_order"), dict):  # the order's settings are identity; its file record is not
        codec["id_order"] = {k: v for k, v in codec["id_order"].items() if k not in ("bytes", "sha256")}
    data = m.get("data") or {}
    return {"teachers": m.get("teachers"), "tokenizer": {"fingerprint": (m.get("tokenizer") or {}).get("fingerprint")},
            "data": {k: data.get(k) for k in ("sources", "max_length", "mask", "seed")}, "codec": codec}


def identity(m: dict) -> dict:
    """Everything a cache's content depends on: the recipe part, then what capture derived from the data."""
    return recipe_part(m) | {"derived": {"version": m.get("version"), "data": m.get("data"), "domains": m.get("domains"),
                                         "plan": {s: e["samples"] for s, e in (m.get("shards") or {}).items()}}}


def _short(v) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
        return "[" + ", ".join(repr(x["name"]) for x in v) + "]"
    if isinstance(v, str) and len(v) == 64:  # a sha256
        return repr(v[:12] + "…")
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def difference(cached, expected, path: str = "", what: str = "cache") -> str | None:
    """The first difference between two JSON values, by path: 'teachers[1].revision: cache has 'a', recipe has 'b''
    (`what` names the artifact the first value comes from: cache, checkpoint)."""
    if isinstance(cached, dict) and isinstance(expected, dict):
        for k in list(expected) + [k for k in cached if k not in expected]:
            found = difference(cached.get(k), expected.get(k), f"{path}.{k}" if path else k, what)
            if found:
                return found
        return None
    if isinstance(cached, list) and isinstance(expected, list) and len(cached) == len(expected):
        for i, (a, b) in enumerate(zip(cached, expected)):
            found = difference(a, b, f"{path}[{i}]", what)
            if found:
                return found
        return None
    if cached == expected:
        return None
    if cached is None and path.startswith("data.") and path.count(".") == 1:
        return f"{path}: not recorded (the cache was made by an older distill)"
    if path.startswith("data.sources[") and path.endswith(".sha256"):
        return (f"{path.removesuffix('.sha256')}.path: the file's contents changed since the cache was made "
                f"(sha256 {_short(cached)} in the cache, {_short(expected)} now)")
    key = f"{path} ({_RECIPE_KEYS[path]})" if path in _RECIPE_KEYS else path
    return f"{key}: {what} has {_short(cached)}, recipe has {_short(expected)}"


# Manifest paths whose recipe key has another name.
_RECIPE_KEYS = {"codec.name": "cache.codec", "codec.k": "cache.top_k", "codec.layout": "cache.codec / cache.id_order",
                "codec.id_order": "cache.id_order", "tokenizer.fingerprint": "tokenizer"}


def check_recipe(m: dict, recipe: Recipe, tok_fp: str, cache_dir) -> None:
    """`distill train`: refuse a cache the recipe would not make, naming the first difference.

    The codec's V and the id order's sample count are taken from the cache: they follow from the
    teachers and the data, which are compared first, so a change there is named at its root."""
    expected = recipe_record(recipe, tok_fp, int(m["codec"]["vocab_size"]), int(m["data"]["samples"]))
    found = difference(recipe_part(m), expected)
    if found:
        raise DistillError(f"{cache_dir}: the cache was made from another recipe: {found}; {REBUILD}")


def open_or_create(cache_dir: Path, fresh: dict, rebuild: bool) -> dict:
    """`distill cache`: reuse a matching cache, refuse (or with rebuild, discard) one made from another recipe.

    Generated responses checked against this recipe by generate.prepare_dir survive a rebuild."""
    for tmp in cache_dir.glob(NAME + ".tmp*"):
        tmp.unlink()  # a run killed inside a manifest write leaves its half-written copy behind
    if (cache_dir / NAME).exists():
        try:
            old = read_manifest(cache_dir)
        except CacheError:  # corrupt or edited: unusable, and with rebuild discarded like any other
            if not rebuild:
                raise
            old = None
        found = difference(identity(old), identity(fresh)) if old is not None else "manifest: unreadable"
        if found is None:
            return old
        what = found.split(":")[0].removeprefix("derived.").split(".")[0].split("[")[0]
        what = {"plan": "shard plan", "version": "format version"}.get(what, what)
        if not rebuild:
            raise CacheError(f"{cache_dir}: existing cache was made with different {what} ({found}); "
                             "set cache.rebuild=true to discard it, or use another cache.dir")
        keep = "generated" if "generation" in fresh["data"] else None
        for p in cache_dir.iterdir():
            if p.name != keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(cache_dir, fresh)
    return fresh
