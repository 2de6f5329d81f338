"""Small file helpers shared by every artifact distill writes (cache, generated responses, checkpoints).

Atomic writes: the content goes to `<name>.tmp<pid>` in the same folder, is fsynced, and is
renamed over the target, so a reader (or a process killed mid-write) sees the old file or the
new one, never half of one. Leftover `*.tmp<pid>` files of a killed run are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write, mode: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text), "w")


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_npy_atomic(path: Path, array: np.ndarray) -> dict:
    """Write `array` as .npy (no pickle). Returns its file record {"bytes", "sha256"}."""
    _write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False), "wb")
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}
