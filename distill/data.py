"""Calibration data: read sources, render, tokenize, and mark the distillation targets.

Every source is a local json/jsonl/parquet/csv file or a Hub dataset id. Rows are
rendered in one of three formats:

- `prompt_response`: prompt + response; targets are the response tokens and EOS.
  With `chat_template: true` the pair is rendered as a user/assistant exchange.
- `chat`: a list of `{role, content}` messages; targets are the assistant turns.
- `text`: plain text; every token after the first is a target.

A sample is `Sample(input_ids, target_mask, domain)` where `target_mask[i]` says
token i is predicted by the loss (from position i-1). Tokenization is
deterministic, so every process and every rerun sees the same token stream.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DataConfig, SourceConfig
from distill.errors import DistillError

_LOCAL_EXT = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Sample:
    input_ids: list[int]
    target_mask: list[bool]
    domain: str | None = None


@dataclass
class DataStats:
    rows: dict[str, int] = field(default_factory=dict)  # rows read per source
    truncated: int = 0  # samples cut at max_length
    dropped: int = 0  # samples with no target token left (prompt filled max_length)

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.rows.items())
        return f"{sum(self.rows.values())} rows ({per}); {self.truncated} truncated, {self.dropped} dropped"


def _read_local(path: Path, src: SourceConfig, key: str) -> list[dict]:
    ext = path.suffix.lower()
    if ext not in _LOCAL_EXT:
        raise DistillError(f"{key}.path: {path} has unsupported extension {ext!r} "
                           f"(expected one of {', '.join(sorted(_LOCAL_EXT))})")
    try:
        if ext == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif ext == ".json":
            data = json.loads(path.read_text())
            rows = data if isinstance(data, list) else data.get(src.split, data.get("data"))
            if not isinstance(rows, list):
                raise DistillError(f"{key}.path: {path} must hold a JSON list of rows "
                                   f"(or a mapping with a {src.split!r} list)")
        else:
            import datasets

            rows = list(datasets.load_dataset(_LOCAL_EXT[ext], data_files=str(path), split="train"))
    except json.JSONDecodeError as exc:
        raise DistillError(f"{key}.path: {path} is not valid JSON (line {exc.lineno})") from None
    return rows


def _read_hub(src: SourceConfig, key: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(src.path, src.name, split=src.split))
    except Exception as exc:  # datasets raises many types for "not found/offline"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistillError(f"{key}.path: {src.path!r} is not a local file and could not be "
                           f"loaded from the Hub ({first})") from None


def read_rows(src: SourceConfig, key: str, seed: int) -> list[dict]:
    path = Path(src.path).expanduser()
    if path.exists():
        rows = _read_local(path, src, key)
    elif src.path.startswith((".", "/", "~")) or Path(src.path).suffix in _LOCAL_EXT:
        raise DistillError(f"{key}.path: file {src.path} does not exist")
    else:
        rows = _read_hub(src, key)
    if src.shuffle:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    if src.num_samples is not None:
        rows = rows[: src.num_samples]
    if not rows:
        raise DistillError(f"{key}.path: {src.path} has no rows")
    return rows


def _field(row: dict, name: str, key: str, i: int, path: str):
    if not isinstance(row, dict) or name not in row:
        raise DistillError(f"{path}: row {i} has no field {name!r} (set {key} to the right field name)")
    return row[name]


def _encode(tok, text: str, add_special: bool) -> list[int]:
    return tok(text, add_special_tokens=add_special)["input_ids"]


def _render_chat(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Full conversation tokens; mask the assistant turns (template assumed prefix-stable)."""
    ids: list[int] = []
    mask: list[bool] = []
    for j, msg in enumerate(messages):
        full = tok.apply_chat_template(messages[: j + 1], tokenize=True, return_dict=False)
        if msg.get("role") == "assistant":
            prefix = tok.apply_chat_template(messages[:j], tokenize=True, add_generation_prompt=True,
                                             return_dict=False) if j else []
            new = full[len(ids):]
            start = max(len(prefix) - len(ids), 0)
            mask.extend([False] * start + [True] * (len(new) - start))
        else:
            new = full[len(ids):]
            mask.extend([False] * len(new))
        ids.extend(new)
    return ids, mask


def render(tok, row: dict, src: SourceConfig, i: int, key: str) -> tuple[list[int], list[bool]]:
    """One row -> (input_ids, target_mask) before truncation."""
    if src.format == "text":
        text = _field(row, src.text_field, f"{key}.text_field", i, src.path)
        ids = _encode(tok, str(text), True)
        return ids, [False] + [True] * (len(ids) - 1)
    if src.format == "chat":
        messages = _field(row, src.messages_field, f"{key}.messages_field", i, src.path)
        if not isinstance(messages, list) or not messages:
            raise DistillError(f"{src.path}: row {i} field {src.messages_field!r} must be a non-empty list of messages")
        if tok.chat_template is None:
            raise DistillError(f"{key}.format: 'chat' needs a tokenizer with a chat template")
        return _render_chat(tok, messages)
    prompt = str(_field(row, src.prompt_field, f"{key}.prompt_field", i, src.path))
    response = str(_field(row, src.response_field, f"{key}.response_field", i, src.path))
    if src.chat_template:
        if tok.chat_template is None:
            raise DistillError(f"{key}.chat_template: the tokenizer has no chat template")
        return _render_chat(tok, [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": response}])
    p_ids = _encode(tok, prompt, True)
    r_ids = _encode(tok, response, False)
    if tok.eos_token_id is not None:
        r_ids = r_ids + [tok.eos_token_id]
    return p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)


def load_samples(tok, cfg: DataConfig) -> tuple[list[Sample], DataStats]:
    """All sources, in recipe order, rendered and tokenized."""
    samples: list[Sample] = []
    stats = DataStats()
    for s_i, src in enumerate(cfg.sources):
        key = f"data.sources[{s_i}]"
        rows = read_rows(src, key, cfg.seed + s_i)
        stats.rows[Path(src.path).name or src.path] = len(rows)
        for i, row in enumerate(rows):
            ids, mask = render(tok, row, src, i, key)
            if cfg.mask == "all":
                mask = [False] + [True] * (len(ids) - 1)
            if len(ids) > cfg.max_length:
                ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
                stats.truncated += 1
            if not any(mask[1:]):
                stats.dropped += 1
                continue
            mask[0] = False  # position 0 is never predicted
            domain = src.domain
            if src.domain_field is not None:
                domain = str(_field(row, src.domain_field, f"{key}.domain_field", i, src.path))
            samples.append(Sample(ids, mask, domain))
    if not samples:
        raise DistillError("data.sources: no usable samples (every row was empty or had no response tokens "
                           "within data.max_length)")
    return samples, stats
