"""The on-disk teacher cache: sharded, memory-mapped, self-describing, verifiable.

Layout of a cache directory (documented for users in README.md "Cache format"):

    manifest.json              written last, atomically, after every completed file
    id_order.npy               int32  [V]  vk codecs with an id order: order[rank] = id (codec.id_order)
    shard-00000/
        input_ids.npy          int32  [n_tokens]        the shard's samples, concatenated
        target_mask.npy        uint8  [n_tokens]        1 where the token is a distillation target
        sample_offsets.npy     int64  [n_samples + 1]   token offset of each sample in the shard
        row_offsets.npy        int64  [n_samples + 1]   teacher-row offset of each sample
        domains.npy            int16  [n_samples]       index into manifest "domains", -1 = none
        teacher-<name>.npy     uint8  [n_rows, record_bytes]   one row per target token, codec records
                                                       (none for an online teacher: "online": true in
                                                       its manifest record; train runs it live)

A target token i of a sample has one row per teacher: the teacher's distribution at
position i-1 (which predicts token i), encoded by the manifest's codec. A sample's
rows are the contiguous slice row_offsets[j]:row_offsets[j+1] of every teacher file.

Every file is written to a temporary name and renamed once complete; the manifest
records each file's byte size and sha256. Opening a cache checks sizes (fast);
`verify()` checks every hash. All content is deterministic, so an interrupted and
resumed capture ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.errors import CacheError

FORMAT = "distill-cache"
VERSION = 1
# A cache whose vk records code ids as ranks in a stored id order (codec.id_order) is written as v2,
# so that a reader from before id orders refuses it instead of decoding ranks as ids.
ORDERED_VERSION = 2
READABLE_VERSIONS = (VERSION, ORDERED_VERSION)
TOKEN_FILES = ("input_ids.npy", "target_mask.npy", "sample_offsets.npy", "row_offsets.npy", "domains.npy")


def teacher_file(name: str) -> str:
    return f"teacher-{name}.npy"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_npy_atomic(path: Path, array: np.ndarray) -> dict:
    """Write `array` as .npy under a temporary name, fsync, rename. Returns its file record."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


@contextmanager
def locked(cache_dir: Path):
    """Serialise manifest updates between processes capturing into the same cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no cache here (manifest.json missing); run `distill cache` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"{path}: manifest is not valid JSON (corrupt cache; rerun `distill cache`)") from None
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise CacheError(f"{path}: not a {FORMAT} v{'/v'.join(map(str, READABLE_VERSIONS))} manifest "
                         f"(found {manifest.get('format')!r} v{manifest.get('version')!r})")
    return manifest


def record_file(cache_dir: Path, shard: str, fname: str, record: dict) -> None:
    """Add one completed file to the manifest (under the lock)."""
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest["shards"][shard]["files"][fname] = record
        manifest["complete"] = all(is_shard_complete(manifest, s) for s in manifest["shards"])
        write_json_atomic(cache_dir / "manifest.json", manifest)


def cached_teachers(manifest: dict) -> list[str]:
    """Names of the teachers whose records the cache holds (online teachers have none)."""
    return [t["name"] for t in manifest["teachers"] if not t.get("online", False)]


def expected_files(manifest: dict) -> list[str]:
    return list(TOKEN_FILES) + [teacher_file(name) for name in cached_teachers(manifest)]


def is_shard_complete(manifest: dict, shard: str) -> bool:
    files = manifest["shards"][shard]["files"]
    return all(f in files for f in expected_files(manifest))


@dataclass
class _Shard:
    name: str
    first_sample: int
    input_ids: np.ndarray
    target_mask: np.ndarray
    sample_offsets: np.ndarray
    row_offsets: np.ndarray
    domains: np.ndarray
    teachers: list[np.ndarray]


class CacheReader:
    """Memory-mapped read access to a complete cache. Never loads the whole cache into RAM."""

    def __init__(self, cache_dir: str | os.PathLike, verify: str = "sizes"):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise CacheError(f"{self.dir}: cache is incomplete (an interrupted capture?); "
                             "rerun `distill cache` to finish it")
        if verify == "full":
            self.verify(full=True)
        elif verify == "sizes":
            self.verify(full=False)
        self.teacher_names = [t["name"] for t in self.manifest["teachers"]]
        self.cached_names = cached_teachers(self.manifest)  # records [n_cached, rows, R], this order
        self.domains: list[str] = self.manifest["domains"]
        self.record_bytes = int(self.manifest["codec"]["record_bytes"])
        self._shards: list[_Shard] = []
        self._starts: list[int] = []
        first = 0
        for name in sorted(self.manifest["shards"]):
            d = self.dir / name
            load = lambda f: np.load(d / f, mmap_mode="r", allow_pickle=False)  # noqa: E731
            shard = _Shard(name, first, load("input_ids.npy"), load("target_mask.npy"),
                           load("sample_offsets.npy"), load("row_offsets.npy"), load("domains.npy"),
                           [load(teacher_file(t)) for t in self.cached_names])
            self._shards.append(shard)
            self._starts.append(first)
            first += len(shard.sample_offsets) - 1
        self.n_samples = first

    def __len__(self) -> int:
        return self.n_samples

    def codec(self):
        """The codec the records were written with (and its id order, hash-checked)."""
        from distill.cache.codec import codec_from_manifest  # local import: codec imports this module

        return codec_from_manifest(self.manifest, self.dir)

    def verify(self, full: bool = True) -> None:
        """Check every file's size (and sha256 when `full`); raise CacheError naming the first bad file."""
        files = [(shard, fname, rec) for shard, entry in sorted(self.manifest["shards"].items())
                 for fname, rec in sorted(entry["files"].items())]
        order = self.manifest["codec"].get("id_order")  # vk codecs: the id order records are coded in
        if order is not None:
            if "sha256" not in order:
                raise CacheError(f"{self.dir / order['file']}: id order missing from the manifest")
            files.insert(0, ("", order["file"], order))
        for shard, fname, rec in files:
            path = self.dir / shard / fname
            if not path.is_file():
                raise CacheError(f"{path}: missing cache file")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise CacheError(f"{path}: size {size} != {rec['bytes']} in manifest (truncated or corrupt)")
            if full and sha256_file(path) != rec["sha256"]:
                raise CacheError(f"{path}: sha256 mismatch (corrupt shard file)")

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < self.n_samples:
            raise IndexError(i)
        import bisect

        s = bisect.bisect_right(self._starts, i) - 1
        return self._shards[s], i - self._starts[s]

    def sample(self, i: int) -> dict:
        """Sample i: input_ids int64 [T], target_mask bool [T], domain index, records uint8 [N, rows, R]."""
        shard, j = self._locate(i)
        t0, t1 = int(shard.sample_offsets[j]), int(shard.sample_offsets[j + 1])
        r0, r1 = int(shard.row_offsets[j]), int(shard.row_offsets[j + 1])
        return {
            "input_ids": np.asarray(shard.input_ids[t0:t1], dtype=np.int64),
            "target_mask": np.asarray(shard.target_mask[t0:t1], dtype=bool),
            "domain": int(shard.domains[j]),
            "records": np.stack([np.asarray(t[r0:r1]) for t in shard.teachers]) if shard.teachers
            else np.zeros((0, r1 - r0, self.record_bytes), np.uint8),
        }

    def lengths(self) -> np.ndarray:
        """Tokens per sample, in sample order."""
        return np.concatenate([np.diff(s.sample_offsets) for s in self._shards])

    def row_counts(self) -> np.ndarray:
        """Target tokens (teacher rows) per sample, in sample order."""
        return np.concatenate([np.diff(s.row_offsets) for s in self._shards])
