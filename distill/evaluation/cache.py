"""Evaluation results kept by what made them, so a rerun scores only what changed.

A result (a task's metrics and its per-example predictions) is stored under a key that hashes
everything that can change its numbers:

    model      content hash of the model's files (distill.content_hash.model_fingerprint)
    task       the resolved task spec (kind, templates, tokenization, generation settings) and
               the exact examples scored (prompts, choices, targets), so the data and the subset
               (eval.limit) are in it too
    protocol   for multiple-choice tasks only (generation does not use it)
    batch_size and device type: batching pads prompts, and padded matmuls round differently;
               on CUDA models are scored in bf16
    versions   EVAL_CODE_VERSION (bump it with any change to distill/evaluation that changes a
               prediction), transformers and torch

Where: one cache per user, shared by every run (`eval.cache_dir`, else $DISTILL_EVAL_CACHE,
else $DISTILL_HOME/eval-cache, else ~/.cache/distill/eval-cache). Shared, because the runs
that repeat work are different runs: a demo rerun in a new run folder, a second recipe that
scores the same base model and experts. The key is content-addressed, so sharing can only
reuse a result computed from identical inputs. Each entry is one readable JSON file,
`results/<key>.json`, written atomically; it carries the fields of its key and a sha256 of
its payload, and an entry that fails any check is ignored with a warning and scored again.
`eval.cache: false` (`--no-eval-cache`) neither reads nor writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from distill.files import write_text_atomic

EVAL_CODE_VERSION = 1
ENTRY_FORMAT = 1


def default_cache_dir() -> Path:
    if os.environ.get("DISTILL_EVAL_CACHE"):
        return Path(os.environ["DISTILL_EVAL_CACHE"])
    home = os.environ.get("DISTILL_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "distill") / "eval-cache"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def task_fingerprint(spec, examples) -> str:
    """sha256 of the resolved spec (less where its files are) and of the examples to score."""
    fields = dataclasses.asdict(spec)
    for where in ("source", "data_path", "templates"):  # locations; their content is below
        fields.pop(where, None)
    if isinstance(fields.get("dataset"), dict):
        fields["dataset"].pop("path", None)
    return _digest({"spec": fields, "examples": [dataclasses.asdict(ex) for ex in examples]})


class EvalCache:
    """Read and write cached results under `root`; `log` receives the warnings."""

    def __init__(self, root: Path, log: Callable[[str], None] = print):
        from distill.content_hash import HashCache

        self.root, self.log = Path(root), log
        self.hashes = HashCache(self.root / "file_hashes.json")

    def key_fields(self, model_fp: str, task_fp: str, spec, protocol: str, limit, batch_size: int,
                   device_type: str) -> dict:
        import torch
        import transformers

        return {"model": model_fp, "task": spec.name, "task_hash": task_fp,
                "protocol": protocol if spec.kind == "multiple_choice" else None, "limit": limit,
                "batch_size": batch_size, "device": device_type, "eval_code_version": EVAL_CODE_VERSION,
                "transformers": transformers.__version__, "torch": torch.__version__}

    def path(self, fields: dict) -> Path:
        return self.root / "results" / f"{_digest(fields)}.json"

    def get(self, fields: dict) -> Optional[tuple[dict, list[dict]]]:
        """(metrics, records) stored under `fields`, or None (absent, or failed a check: warned)."""
        path = self.path(fields)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            problem = self._check(entry, fields)
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            self.log(f"warning: eval cache entry {path} ignored ({problem}); scoring again")
            return None
        return entry["metrics"], entry["records"]

    @staticmethod
    def _check(entry, fields: dict) -> Optional[str]:
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
            return "not a cache entry of this format"
        if entry.get("key") != fields:
            return "its key fields differ"
        if entry.get("sha256") != _digest([entry.get("metrics"), entry.get("records")]):
            return "its content does not match its sha256"
        m, r = entry["metrics"], entry["records"]
        if not isinstance(m, dict) or not isinstance(r, list) or m.get("n") != len(r):
            return "metrics and records disagree"
        return None

    def put(self, fields: dict, metrics: dict, records: list[dict]) -> None:
        path = self.path(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hashed as it will read back (tuples become lists), so a good entry always checks.
        metrics, records = json.loads(json.dumps([metrics, records], default=str))
        entry = {"format": ENTRY_FORMAT, "key": fields, "metrics": metrics, "records": records,
                 "sha256": _digest([metrics, records])}
        # Key order kept (not sorted), so predictions written from the cache equal fresh ones byte for byte.
        write_text_atomic(path, json.dumps(entry, indent=1, ensure_ascii=False) + "\n")
