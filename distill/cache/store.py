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
(built, read and checked by distill/cache/manifest.py) records each file's byte size and
sha256. Opening a cache checks sizes (fast); `verify()` checks every hash. All content is deterministic, so an interrupted and
resumed capture ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.cache.manifest import (TOKEN_FILES, cached_teachers, codec_from_manifest, expected_files, read_manifest,
                                    teacher_file)
from distill.errors import CacheError
from distill.files import sha256_file, write_json_atomic


# `.verified.json`: each file's sha256 as verified, with its size, mtime and inode then. A full check
# re-hashes only files whose stat changed since (any write changes it), so that training a cache
# again, or each `--resume`, does not re-read a cache of hundreds of GB. Bit rot that leaves the stat
# alone is caught by `distill cache verify`, which hashes everything (no stamp).
STAMP = ".verified.json"


def _read_stamp(cache_dir: Path) -> dict:
    try:
        stamp = json.loads((cache_dir / STAMP).read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(cache_dir: Path, seen: dict) -> None:
    try:
        write_json_atomic(cache_dir / STAMP, seen)
    except OSError:  # a read-only cache is verified in full every time
        pass


# dtype and rank of each token file (the layout above)
_FORMS = {"input_ids.npy": (np.int32, 1), "target_mask.npy": (np.uint8, 1), "sample_offsets.npy": (np.int64, 1),
          "row_offsets.npy": (np.int64, 1), "domains.npy": (np.int16, 1)}


_RESOURCE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES, errno.EPERM)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


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
        if verify in ("full", "rehash"):  # rehash: every file, whatever the stamp says (`distill cache verify`)
            self.verify(full=True, use_stamp=verify == "full")
        elif verify == "sizes":
            self.verify(full=False)
        self.teacher_names = [t["name"] for t in self.manifest["teachers"]]
        self.cached_names = cached_teachers(self.manifest)  # records [n_cached, rows, R], this order
        self.domains: list[str] = self.manifest["domains"]
        self.record_bytes = int(self.manifest["codec"]["record_bytes"])
        self._shards: list[_Shard] = []
        self._starts: list[int] = []
        first = 0
        rows = 0
        for name in sorted(self.manifest["shards"]):
            d = self.dir / name
            shard = _Shard(name, first, *(self._load(d / f, *_FORMS[f]) for f in TOKEN_FILES),
                           [self._load(d / teacher_file(t), np.uint8, 2) for t in self.cached_names])
            self._check_shard(shard, d)
            self._shards.append(shard)
            self._starts.append(first)
            first += len(shard.sample_offsets) - 1
            rows += int(shard.row_offsets[-1])
        self.n_samples = first
        data = self.manifest["data"]
        if (first, rows) != (data["samples"], data["targets"]):
            raise CacheError(f"{self.dir / 'manifest.json'}: data.samples / data.targets say {data['samples']} / "
                             f"{data['targets']}, the shards hold {first} / {rows} (corrupt or edited manifest)")

    @staticmethod
    def _load(path: Path, dtype, ndim: int) -> np.ndarray:
        """Map one .npy file, refusing (by name) a header that is not the documented dtype and rank.

        Without `verify="full"` a byte flipped in a header is only caught here: numpy either
        fails to parse it or maps a wrong dtype/shape, and either is named as corruption."""
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CacheError(f"{path}: missing cache file") from None
        except OSError as exc:
            if exc.errno in _RESOURCE:  # not the file's fault: too many open files, maps, no permission
                raise CacheError(f"{path}: cannot map it ({exc.strerror}); raise `ulimit -n` or "
                                 "vm.max_map_count, or fix the permissions") from None
            raise CacheError(f"{path}: not a readable .npy file ({_first_line(exc)}): corrupt cache; "
                             "`distill cache verify` names every bad file") from None
        except (ValueError, EOFError) as exc:  # numpy's header parser and mmap raise these
            raise CacheError(f"{path}: not a readable .npy file ({_first_line(exc)}): corrupt cache; "
                             "`distill cache verify` names every bad file") from None
        if arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
            raise CacheError(f"{path}: header says {arr.dtype} with {arr.ndim} dimension(s), expected "
                             f"{np.dtype(dtype)} with {ndim}: corrupt cache file")
        return arr

    def _check_shard(self, s: _Shard, d: Path) -> None:
        """The offsets agree with the arrays they index (a few reads, not a pass over the data)."""
        n = len(s.sample_offsets) - 1
        problems = [
            ("sample_offsets.npy", n >= 1 and len(s.row_offsets) == n + 1 and len(s.domains) == n,
             "one offset per sample plus one, as row_offsets.npy and domains.npy say"),
            ("sample_offsets.npy", n >= 1 and int(s.sample_offsets[0]) == 0
             and int(s.sample_offsets[-1]) == len(s.input_ids) == len(s.target_mask),
             "offsets from 0 to the number of tokens in input_ids.npy and target_mask.npy"),
            ("row_offsets.npy", n >= 1 and int(s.row_offsets[0]) == 0
             and all(int(s.row_offsets[-1]) == len(t) for t in s.teachers), "offsets from 0 to every teacher's rows"),
        ] + [(teacher_file(name), t.shape[1:] == (self.record_bytes,), f"{self.record_bytes}-byte records")
             for name, t in zip(self.cached_names, s.teachers)]
        for fname, ok, want in problems:
            if not ok:
                raise CacheError(f"{d / fname}: does not hold {want} (corrupt cache file)")

    def __len__(self) -> int:
        return self.n_samples

    def codec(self):
        """The codec the records were written with (and its id order, hash-checked)."""
        return codec_from_manifest(self.manifest, self.dir)

    def verify(self, full: bool = True, use_stamp: bool = True) -> None:
        """Check every file's size (and sha256 when `full`); raise CacheError naming the first bad file."""
        files = [(shard, fname, rec) for shard, entry in sorted(self.manifest["shards"].items())
                 for fname, rec in sorted(entry["files"].items())]
        order = self.manifest["codec"].get("id_order")  # vk codecs: the id order records are coded in
        if order is not None:
            if "sha256" not in order:
                raise CacheError(f"{self.dir / order['file']}: id order missing from the manifest")
            files.insert(0, ("", order["file"], order))
        for shard, entry in sorted(self.manifest["shards"].items()):
            missing = [f for f in expected_files(self.manifest) if f not in entry["files"]]
            if missing and self.manifest["complete"]:
                raise CacheError(f"{self.dir / 'manifest.json'}: shards.{shard}.files lacks {missing[0]} in a cache "
                                 "marked complete (corrupt or edited manifest)")
        stamp = _read_stamp(self.dir) if full and use_stamp else {}
        seen = {}
        for shard, fname, rec in files:
            path = self.dir / shard / fname
            if not path.is_file():
                raise CacheError(f"{path}: missing cache file")
            st = path.stat()
            if st.st_size != rec["bytes"]:
                raise CacheError(f"{path}: size {st.st_size} != {rec['bytes']} in manifest (truncated or corrupt)")
            key, state = str(Path(shard) / fname), [rec["sha256"], st.st_size, st.st_mtime_ns, st.st_ino]
            if full and stamp.get(key) != state and sha256_file(path) != rec["sha256"]:
                raise CacheError(f"{path}: sha256 mismatch (corrupt shard file)")
            seen[key] = state
        if full and seen != stamp:
            _write_stamp(self.dir, seen)

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < self.n_samples:
            raise IndexError(i)
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
