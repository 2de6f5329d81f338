"""Small file helpers shared by every artifact distill writes (cache, generated responses, checkpoints).

Atomic writes: the content goes to `<name>.tmp<pid>` in the same folder, is fsynced, and is
renamed over the target, so a reader (or a process killed mid-write) sees the old file or the
new one, never half of one. Leftover `*.tmp<pid>` files of a killed run are never read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from distill.faults import kill_point


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, the file size limit, the quota


def _write_atomic(path: Path, write, mode: str) -> None:
    """A full disk (or a file size limit) leaves no temporary behind and raises an OSError that names
    `path`, which the CLI turns into its one-line error."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            kill_point(f"write:{path.name}")  # the reliability tests' SIGKILL, between content and rename
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text), "w")


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


class _Chunks:
    """A file seen by numpy as a plain writable object, so that it writes the array in chunks through
    Python's `write` (which raises on a full disk) rather than C's fwrite through `tofile` (which,
    at a file size limit, stops short without an error, leaving a truncated file that looks written)."""

    def __init__(self, f):
        self.write = f.write


def write_npy_atomic(path: Path, array: np.ndarray) -> dict:
    """Write `array` as .npy (no pickle). Returns its file record {"bytes", "sha256"}."""
    _write_atomic(path, lambda f: np.save(_Chunks(f), np.ascontiguousarray(array), allow_pickle=False), "wb")
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


_FULL_TEXT = ("os error 28", "os error 27", "os error 122", "No space left", "File too large", "Disk quota",
              "file write failed", "iostream error")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of space: an OSError, or what torch's and
    safetensors' writers raise for one (a RuntimeError or SafetensorError quoting the OS error)."""
    seen = 0
    while exc is not None and seen < 8:  # torch raises a second error while closing the failed file
        if (isinstance(exc, OSError) and exc.errno in FULL) or any(t in str(exc) for t in _FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
