"""Calibration data: read sources, render, tokenize, and mark the distillation targets.

Every source is a local json/jsonl/parquet/csv file or a Hub dataset id. Rows are
rendered in one of three formats:

- `prompt_response`: prompt + response; targets are the response tokens and EOS.
  With `chat_template: true` the pair is rendered as a user/assistant exchange.
- `chat`: a list of `{role, content}` messages; targets are the assistant turns.
- `text`: plain text; every token after the first is a target.

A source with a `generate:` block is prompt-only: its rows give the prompt (the
`prompt_field`, or the `chat` messages so far) and a teacher writes the response
before capture (distill/cache/generate.py). `load_samples` takes that step as a
callable, so this module never touches a model; the generated tokens are appended
to the prompt tokens as they are (never decoded and re-encoded) and are the targets.

A sample is `Sample(input_ids, target_mask, domain)` where `target_mask[i]` says
token i is predicted by the loss (from position i-1). Tokenization is
deterministic, so every process and every rerun sees the same token stream.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill.config import DataConfig, GenerateConfig, SourceConfig, TeacherConfig, generating_teacher
from distill.errors import DistillError

_LOCAL_EXT = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Sample:
    input_ids: list[int]
    target_mask: list[bool]
    domain: str | None = None


@dataclass
class Prompt:
    """A prompt-only row whose response a teacher will generate."""

    source: int  # index in data.sources
    row: int  # row index in the source (after shuffle and num_samples)
    input_ids: list[int]
    domain: str | None
    teacher: str  # the generating teacher
    max_new_tokens: int  # min(generate.max_new_tokens, room left under data.max_length), >= 1
    gen: GenerateConfig


@dataclass
class Generated:
    ids: list[int]  # the response tokens, ending with the stop token when `eos`
    eos: bool  # stopped at EOS (else it ran out of tokens)


@dataclass
class DataStats:
    rows: dict[str, int] = field(default_factory=dict)  # rows read per source
    truncated: int = 0  # samples cut at max_length
    dropped: int = 0  # samples with no target token left (prompt filled max_length)
    generated: int = 0  # responses written by a teacher (prompt-only sources)
    hit_max_new_tokens: int = 0  # generated responses that ran to generate.max_new_tokens without EOS

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.rows.items())
        gen = (f"; {self.generated} responses generated, {self.hit_max_new_tokens} hit max_new_tokens"
               if self.generated else "")
        return f"{sum(self.rows.values())} rows ({per}); {self.truncated} truncated, {self.dropped} dropped{gen}"


class Row(dict):
    """A data row, knowing where in its file it came from ("line 12" of a JSON-lines file, "row 3" of
    a table), so that an error names the place even after shuffling."""

    def __init__(self, data: dict, where: str):
        super().__init__(data)
        self.where = where


def _where(row, i: int) -> str:
    return getattr(row, "where", f"row {i}")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        raise DistillError(f"{path}: line {line} is not UTF-8 text (byte {exc.start}; a binary file, or another "
                           "encoding?)") from None


def _objects(items, path: Path, unit: str) -> list[Row]:
    """(number, parsed value) pairs -> rows, refusing any value that is not a JSON object / mapping."""
    rows = []
    for n, obj in items:
        if not isinstance(obj, dict):
            raise DistillError(f"{path}: {unit} {n} is not an object with fields (got {type(obj).__name__})")
        rows.append(Row(obj, f"{unit} {n}"))
    return rows


def _read_local(path: Path, src: SourceConfig, key: str) -> list[Row]:
    ext = path.suffix.lower()
    if ext not in _LOCAL_EXT:
        raise DistillError(f"{key}.path: {path} has unsupported extension {ext!r} "
                           f"(expected one of {', '.join(sorted(_LOCAL_EXT))})")
    if ext == ".jsonl":
        parsed = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                try:
                    parsed.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DistillError(f"{path}: line {n} is not valid JSON ({exc.msg} at column "
                                       f"{exc.colno})") from None
        return _objects(parsed, path, "line")
    if ext == ".json":
        try:
            data = json.loads(_text(path))
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
        rows = data if isinstance(data, list) else data.get(src.split, data.get("data")) if isinstance(data, dict) \
            else None
        if not isinstance(rows, list):
            raise DistillError(f"{key}.path: {path} must hold a JSON list of rows "
                               f"(or a mapping with a {src.split!r} list)")
        return _objects(enumerate(rows), path, "item")
    import datasets

    try:
        rows = list(datasets.load_dataset(_LOCAL_EXT[ext], data_files=str(path), split="train"))
    except Exception as exc:  # pyarrow and datasets raise many types for a malformed table
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistillError(f"{path}: not a readable {ext[1:]} table ({first})") from None
    return _objects(enumerate(rows), path, "row")


def _read_hub(src: SourceConfig, key: str) -> list[dict]:
    import datasets

    try:
        return [Row(r, f"row {n}") for n, r in enumerate(datasets.load_dataset(src.path, src.name, split=src.split))]
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
        raise DistillError(f"{path}: {_where(row, i)} has no field {name!r} (set {key} to the right field name)")
    return row[name]


def _encode(tok, text: str, add_special: bool) -> list[int]:
    return tok(text, add_special_tokens=add_special)["input_ids"]


def _chat(tok, messages, row, i: int, src: SourceConfig) -> tuple[list[int], list[bool]]:
    """`_render_chat` of a row's messages, each checked to be {role, content} text; a template that
    raises on them (roles out of order, say) is named with the row."""
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and (m.get("content") is None or isinstance(m["content"], (str, list))) for m in messages):
        raise DistillError(f"{src.path}: {_where(row, i)}: every message must be {{role: text, content: text, a "
                           "list of parts, or null}")
    try:
        return _render_chat(tok, messages)
    except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DistillError(f"{src.path}: {_where(row, i)}: the tokenizer's chat template refused it "
                           f"({first})") from None


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
            raise DistillError(f"{src.path}: {_where(row, i)} field {src.messages_field!r} must be a non-empty "
                               "list of messages")
        if tok.chat_template is None:
            raise DistillError(f"{key}.format: 'chat' needs a tokenizer with a chat template")
        return _chat(tok, messages, row, i, src)
    prompt = str(_field(row, src.prompt_field, f"{key}.prompt_field", i, src.path))
    response = str(_field(row, src.response_field, f"{key}.response_field", i, src.path))
    if src.chat_template:
        if tok.chat_template is None:
            raise DistillError(f"{key}.chat_template: the tokenizer has no chat template")
        return _chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], row, i,
                     src)
    p_ids = _encode(tok, prompt, True)
    r_ids = _encode(tok, response, False)
    if tok.eos_token_id is not None:
        r_ids = r_ids + [tok.eos_token_id]
    return p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)


def render_prompt(tok, row: dict, src: SourceConfig, i: int, key: str) -> list[int]:
    """The prompt tokens of a prompt-only row, ready for a teacher to continue."""
    if src.format == "chat":
        messages = _field(row, src.messages_field, f"{key}.messages_field", i, src.path)
        if (not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict)
                or messages[-1].get("role") == "assistant"):
            raise DistillError(f"{src.path}: {_where(row, i)} field {src.messages_field!r} must be a non-empty list of "
                               "messages not ending with an assistant turn (generate writes that turn)")
        if tok.chat_template is None:
            raise DistillError(f"{key}.format: 'chat' needs a tokenizer with a chat template")
        return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    prompt = str(_field(row, src.prompt_field, f"{key}.prompt_field", i, src.path))
    if src.chat_template:
        if tok.chat_template is None:
            raise DistillError(f"{key}.chat_template: the tokenizer has no chat template")
        return list(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False))
    ids = _encode(tok, prompt, True)
    if not ids:
        raise DistillError(f"{src.path}: {_where(row, i)} has an empty prompt and the tokenizer adds no BOS; "
                           "a teacher cannot continue nothing")
    return ids


def _finish(ids: list[int], mask: list[bool], domain: str | None, cfg: DataConfig,
            stats: DataStats) -> Sample | None:
    """Apply data.mask and max_length; None (counted as dropped) when no target is left."""
    if cfg.mask == "all":
        mask = [False] + [True] * (len(ids) - 1)
    if len(ids) > cfg.max_length:
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
        stats.truncated += 1
    if not any(mask[1:]):
        stats.dropped += 1
        return None
    mask[0] = False  # position 0 is never predicted
    return Sample(ids, mask, domain)


def read_items(tok, cfg: DataConfig, teachers: list[TeacherConfig]) -> tuple[list[Sample | Prompt], DataStats]:
    """All sources in recipe order: finished samples, and prompts still waiting for a response."""
    items: list[Sample | Prompt] = []
    stats = DataStats()
    for s_i, src in enumerate(cfg.sources):
        key = f"data.sources[{s_i}]"
        rows = read_rows(src, key, cfg.seed + s_i)
        stats.rows[Path(src.path).name or src.path] = len(rows)
        for i, row in enumerate(rows):
            domain = src.domain
            if src.domain_field is not None:
                domain = str(_field(row, src.domain_field, f"{key}.domain_field", i, src.path))
            if src.generate is None:
                item = _finish(*render(tok, row, src, i, key), domain, cfg, stats)
            else:
                item = _prompt(tok, row, s_i, i, domain, cfg, teachers, stats)
            if item is not None:
                items.append(item)
    return items, stats


def _prompt(tok, row, s_i: int, i: int, domain: str | None, cfg: DataConfig,
            teachers: list[TeacherConfig], stats: DataStats) -> Sample | Prompt | None:
    src, key = cfg.sources[s_i], f"data.sources[{s_i}]"
    ids = render_prompt(tok, row, src, i, key)
    room = cfg.max_length - len(ids)
    if room <= 0:  # the prompt fills max_length: nothing to generate
        return _finish(ids, [False] * len(ids), domain, cfg, stats)
    teacher = generating_teacher(src.generate, domain, teachers)
    if teacher is None:
        raise DistillError(f"{key}.generate.teacher: {_where(row, i)} has domain {domain!r}, which no teacher lists in "
                           "its domains (and no teacher has empty domains); name a teacher here")
    return Prompt(s_i, i, ids, domain, teacher, min(src.generate.max_new_tokens, room), src.generate)


def complete(items: list[Sample | Prompt], responses: list[Generated], cfg: DataConfig,
             stats: DataStats) -> list[Sample]:
    """Prompts + their generated responses (in prompt order) -> samples; the response is the target."""
    out: list[Sample] = []
    it = iter(responses)
    for item in items:
        if isinstance(item, Prompt):
            gen = next(it)
            stats.generated += 1
            if not gen.eos and item.max_new_tokens == item.gen.max_new_tokens:
                stats.hit_max_new_tokens += 1
            elif not gen.eos:
                stats.truncated += 1  # stopped by data.max_length, not by max_new_tokens
            item = _finish(item.input_ids + gen.ids, [False] * len(item.input_ids) + [True] * len(gen.ids),
                           item.domain, cfg, stats)
        if item is not None:
            out.append(item)
    return out


def load_samples(tok, cfg: DataConfig, teachers: list[TeacherConfig] = (),
                 generate: Callable[[list[Prompt]], list[Generated]] | None = None) -> tuple[list[Sample], DataStats]:
    """All sources, in recipe order, rendered and tokenized; prompt-only rows answered by `generate`."""
    items, stats = read_items(tok, cfg, list(teachers))
    prompts = [x for x in items if isinstance(x, Prompt)]
    if prompts and generate is None:
        raise ValueError("prompt-only sources need a generate callable")  # a bug in the caller
    responses = generate(prompts) if prompts else []
    if len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")  # a bug in the caller
    samples = complete(items, responses, cfg, stats)
    if not samples:
        raise DistillError("data.sources: no usable samples (every row was empty or had no response tokens "
                           "within data.max_length)")
    return samples, stats
