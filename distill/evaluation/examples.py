"""Read a task's rows and turn them into prompts, choices and targets.

Rows come from a local file (.jsonl, .json, .csv, .parquet) or, for users
online, a Hub dataset. Every row is checked up front for the fields the task
uses, so a bad data file fails with one line before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from jinja2 import TemplateSyntaxError, meta

from distill.errors import DistillError
from distill.evaluation.prompts import _ENV, render, render_choices, render_text
from distill.evaluation.scorers import parse_gold_number
from distill.evaluation.spec import TaskSpec


@dataclass
class Example:
    index: int  # row number in the task's data (the subset keeps the full set's numbering)
    prompt: str
    target: str  # the gold answer text (for multiple choice: the gold choice)
    choices: tuple[str, ...] = ()
    label: int = -1  # index of the gold choice (multiple choice only)
    template: str = ""  # name of the template used (multiple choice only)


def _read_local(spec: TaskSpec) -> list[dict]:
    path = spec.data_path
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = []
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DistillError(f"{path}: line {n}: not valid JSON") from None
            return rows
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DistillError(f"{path}: not valid JSON (line {exc.lineno})") from None
            if not isinstance(data, list):
                raise DistillError(f"{path}: expected a JSON array of rows (or use .jsonl)")
            return data
        if path.suffix in (".csv", ".parquet"):
            import datasets

            return list(datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillError(f"{path}: cannot read: {exc}") from None
    raise DistillError(f"{spec.source}: dataset.path: unsupported file type {path.suffix!r} "
                       "(expected .jsonl, .json, .csv or .parquet)")


def _read_hub(spec: TaskSpec) -> list[dict]:
    import datasets

    ds = spec.dataset
    try:
        return list(datasets.load_dataset(ds.hub, ds.name, split=ds.split))
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated: all the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"{spec.source}: dataset.hub: cannot load {ds.hub!r} "
                           f"(name={ds.name}, split={ds.split}): {first}") from None


def read_rows(spec: TaskSpec) -> list[dict]:
    rows = _read_local(spec) if spec.data_path is not None else _read_hub(spec)
    where = spec.data_path or spec.dataset.hub
    if not rows:
        raise DistillError(f"{where}: the task {spec.name!r} has no examples")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DistillError(f"{where}: row {i}: expected an object with named fields, got {type(row).__name__}")
    return rows


def _variables(jinja: str, where: str) -> set[str]:
    try:
        return meta.find_undeclared_variables(_ENV.parse(jinja))
    except TemplateSyntaxError as exc:
        raise DistillError(f"{where}: jinja syntax error at line {exc.lineno}: {exc.message}") from None


def _require_fields(rows: list[dict], fields: set[str], where: str, task: str) -> None:
    # Jinja renders an undefined variable as "", so a misspelt field would
    # silently give empty prompts: check every row instead.
    for i, row in enumerate(rows):
        missing = sorted(f for f in fields if f not in row)
        if missing:
            raise DistillError(f"{where}: row {i}: missing field {missing[0]!r} "
                               f"(task {task!r} uses: {', '.join(sorted(fields))})")


def _label(spec: TaskSpec, value: Any, n_choices: int, where: str) -> int:
    lookup = {k.lower(): v for k, v in spec.label_map.items()}
    key = str(value).lower()
    if key in lookup:
        label = lookup[key]
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise DistillError(f"{where}: {spec.label_field} = {value!r} is not a choice index "
                           f"(label_map knows: {', '.join(spec.label_map) or 'nothing'})")
    if not 0 <= label < n_choices:
        raise DistillError(f"{where}: {spec.label_field} = {value!r} is out of range for {n_choices} choices")
    return label


def _choice_examples(spec: TaskSpec, rows: list[dict]) -> list[Example]:
    templates = spec.template_list
    where = spec.data_path or spec.dataset.hub
    used = {spec.label_field}
    for t in templates:
        used |= _variables(t.jinja, spec.source) | _variables(t.answer_choices or "", spec.source)
    _require_fields(rows, used - {"answer_choices"}, str(where), spec.name)
    out = []
    for i, row in enumerate(rows):
        # Round-robin, as the starter kit did: example i uses template i mod n.
        t = templates[i % len(templates)]
        tname = f"{spec.source}: template {t.name!r}"
        choices = render_choices(t.answer_choices, row, tname) if t.answer_choices else tuple(spec.choices)
        label = _label(spec, row[spec.label_field], len(choices), f"{where}: row {i}")
        # promptsource templates index answer_choices with the label, so pass the index.
        r = render(t.jinja, t.answer_choices, {**row, spec.label_field: label}, spec.truncate_chars, where=tname)
        out.append(Example(index=i, prompt=r.prompt, target=choices[label], choices=choices,
                           label=label, template=t.name))
    return out


def _generation_examples(spec: TaskSpec, rows: list[dict]) -> list[Example]:
    where = str(spec.data_path or spec.dataset.hub)
    used = {spec.target_field}
    used |= _variables(spec.prompt_template, spec.source) if spec.prompt_template else {spec.prompt_field}
    _require_fields(rows, used, where, spec.name)
    out = []
    for i, row in enumerate(rows):
        if spec.prompt_template is not None:
            prompt = render_text(spec.prompt_template, row, where=f"{spec.source}: prompt_template")
        else:
            prompt = str(row[spec.prompt_field])
        target = str(row[spec.target_field])
        if spec.kind == "generate_number" and parse_gold_number(target) is None:
            raise DistillError(f"{where}: row {i}: {spec.target_field} = {target!r} is not a number "
                               "(expected e.g. 12, 0.5 or 3/4)")
        out.append(Example(index=i, prompt=prompt, target=target))
    return out


def build_examples(spec: TaskSpec, limit: Optional[int] = None) -> list[Example]:
    """All examples of a task, or the first `limit` rows (a fixed subset).

    The subset is the first N rows in file order, as the starter kit's
    `max_examples_per_dataset` did; each keeps the template it has in the full
    run, so a limited run scores exactly the first N predictions of a full one.
    """
    rows = read_rows(spec)
    if limit is not None:
        rows = rows[:limit]
    if spec.kind == "multiple_choice":
        return _choice_examples(spec, rows)
    return _generation_examples(spec, rows)
