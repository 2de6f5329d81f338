"""Content hashes of model folders, cheap enough to take before every evaluation.

A model is identified by what its files hold, not by its path: the sha256 of every file that
loading it can read (weights, config.json, generation_config.json, tokenizer files, chat
template, adapter files), streamed. A file's hash is remembered in a small JSON keyed by its
path and stat (size, mtime, ctime, inode), so a 16 GB model is read once; a file changed
since (even one byte, same size) has a new ctime and is hashed again. As git does for its
index, a hash is only remembered for a file last modified more than RACY_S seconds before it
was hashed, so a write in the same timestamp tick as the hashing cannot hide.

    hashes = HashCache(cache_dir / "file_hashes.json")
    key = model_fingerprint("runs/x/student", hashes=hashes)    # None: cannot tell (e.g. offline Hub id)
    hashes.save()
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from distill.files import sha256_file, write_json_atomic

RACY_S = 2.0
# Files that loading a model never reads: distill loads weights through safetensors only
# (models.load_model), and a GGUF model reads only the named .gguf file.
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf", ".md")
_SKIP_NAMES = {"LICENSE", "LICENSE.txt", "NOTICE"}  # and dot files (.gitattributes, markers)
# What a Hub snapshot needs for the hash (and for loading): no other weight formats.
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"]


class HashCache:
    """sha256 of files, remembered by (resolved path, size, mtime_ns, ctime_ns, inode).

    path=None: remember nothing on disk. An unreadable or malformed JSON is treated as empty
    (it only ever saves work; the worst case is hashing again)."""

    def __init__(self, path: Optional[Path] = None):
        self.path, self.entries, self.dirty = (Path(path) if path else None), {}, False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 5}
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def sha256(self, path: Path) -> str:
        real = os.path.realpath(path)  # Hub snapshots are symlinks into blobs/
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self.entries.get(real)
        if hit is not None and hit[:4] == stamp:
            return hit[4]
        digest = sha256_file(Path(real))
        if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > RACY_S:
            self.entries[real] = stamp + [digest]
            self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self.dirty = False


def _folder(ref: str, revision: Optional[str], gguf_file: Optional[str]) -> Optional[Path]:
    """The local folder holding `ref`'s files; a Hub id's resolved revision (downloaded as loading
    would); None when it cannot be resolved (offline and not cached, typo: loading reports it)."""
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        return path
    if path.exists() or ref.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    patterns = [gguf_file, "*.json"] if gguf_file else _HUB_PATTERNS
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except Exception:  # any Hub failure only means "cannot cache this model"
        return None


def folder_fingerprint(folder: Path, hashes: HashCache, gguf_file: Optional[str] = None) -> dict[str, str]:
    """{file name: sha256} of the files in `folder` (top level) that loading can read."""
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name in _SKIP_NAMES or p.name.startswith("."):
            continue
        if p.name.endswith(_SKIP_SUFFIXES) and p.name != gguf_file:
            continue
        out[p.name] = hashes.sha256(p)
    return out


def model_fingerprint(ref: str, *, revision: Optional[str] = None, adapter: Optional[str] = None,
                      gguf_file: Optional[str] = None, hashes: Optional[HashCache] = None) -> Optional[str]:
    """sha256 over the content of the model's files (and its adapter's); None if it cannot be told."""
    hashes = hashes or HashCache()
    model_dir = _folder(ref, revision, gguf_file)
    if model_dir is None:
        return None
    parts: dict = {"model": folder_fingerprint(model_dir, hashes, gguf_file), "gguf_file": gguf_file}
    if not any(name.endswith((".safetensors", ".gguf")) for name in parts["model"]):
        return None  # no weights we know how to hash: never claim two such models are equal
    if adapter:
        adapter_dir = _folder(adapter, None, None)
        if adapter_dir is None:
            return None
        parts["adapter"] = folder_fingerprint(adapter_dir, hashes)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
