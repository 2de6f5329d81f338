"""Task specs: one small YAML (or JSON) file per evaluation task.

A task is data, like an lm-evaluation-harness task YAML: where the examples
are, how to turn a row into a prompt, and which `kind` scores it. The kinds:

    multiple_choice   score each answer choice by log-likelihood; metric: accuracy
    generate_number   greedy generation, then the starter kit's number rule (MAWPS)
    generate_exact    greedy generation, prediction == target after stripping

A task is addressed by name (`eval/tasks/<name>.yaml`) or by the path of a spec
file anywhere; relative paths inside a spec (data, templates) are resolved
against the spec file's folder. See docs/eval.md for every key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from distill.config import plain_name
from distill.errors import ConfigError, DistillError
from distill.schema import build

# eval/ lives at the repository root, next to the `distill` package.
EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"
TASKS_DIR = EVAL_DIR / "tasks"

Kind = Literal["multiple_choice", "generate_number", "generate_exact"]
KINDS = ("multiple_choice", "generate_number", "generate_exact")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class DatasetSpec:
    path: Optional[str] = None  # local .jsonl/.json/.csv/.parquet file, relative to the spec file
    hub: Optional[str] = None  # or a Hub dataset id (needs network), e.g. super_glue, MU-NLPC/Calc-mawps
    name: Optional[str] = None  # Hub config name, e.g. boolq
    split: str = "validation"  # Hub split (ignored for local files)


@dataclass
class TemplateSpec:
    """A promptsource template: `jinja` renders "prompt ||| target"."""

    jinja: str
    name: str = ""
    answer_choices: Optional[str] = None  # jinja, e.g. "No ||| Yes"
    id: Optional[str] = None


@dataclass
class TaskSpec:
    kind: Kind
    dataset: Union[str, DatasetSpec]  # a string is shorthand for {path: ...}
    name: str = ""  # default: the spec file's stem
    version: int = 1  # bump when the task's data, prompts or scoring change
    description: str = ""
    # --- tokenization (all kinds)
    add_bos: Literal["auto", "always", "never"] = "auto"  # auto: what the tokenizer does by default
    max_prompt_tokens: Optional[int] = None  # keep the first N prompt tokens (the starter kit: 1024)
    # --- multiple_choice
    templates: Union[str, list[TemplateSpec], None] = None  # a JSON file or an inline list; round-robin
    choices: list[str] = field(default_factory=list)  # used when a template has no answer_choices
    label_field: str = "label"  # the gold choice's index (ints, or strings through label_map)
    label_map: dict[str, int] = field(default_factory=dict)  # e.g. {"false": 0, "true": 1}
    truncate_chars: Optional[int] = None  # promptsource's per-variable truncation (2048)
    # score with this protocol whatever eval.protocol says (a task variant such as boolq_standard);
    # null: eval.protocol
    protocol: Optional[Literal["competition", "standard"]] = None
    # --- generate_*
    prompt_field: str = "prompt"  # the prompt, verbatim ...
    prompt_template: Optional[str] = None  # ... or a jinja string over the row's fields
    target_field: str = "target"
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # cut the prediction at the first of these
    # --- resolved by load_task, not read from the file
    source: str = field(default="", init=False)  # the spec file
    data_path: Optional[Path] = field(default=None, init=False)  # resolved dataset.path
    template_list: list[TemplateSpec] = field(default_factory=list, init=False)

    @property
    def is_generative(self) -> bool:
        return self.kind != "multiple_choice"

    def protocol_under(self, default: str) -> str:
        """The protocol this task is scored with when eval.protocol is `default`."""
        return self.protocol or default


def list_tasks() -> list[str]:
    """Names of the tasks shipped under eval/tasks/."""
    if not TASKS_DIR.is_dir():
        return []
    return sorted(p.stem for p in TASKS_DIR.iterdir() if p.suffix in SPEC_SUFFIXES)


def _find_spec(name_or_path: str) -> Path:
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.suffix in SPEC_SUFFIXES or "/" in text or "\\" in text:
        if not path.is_file():
            raise DistillError(f"eval task {text!r}: spec file not found")
        return path.resolve()
    for suffix in SPEC_SUFFIXES:
        candidate = TASKS_DIR / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    known = ", ".join(list_tasks()) or "none shipped"
    raise DistillError(f"eval task {text!r}: unknown task (known: {known}; or give the path of a .yaml spec)")


def _read(path: Path):
    """Parse a YAML or JSON file; DistillError naming the file and line on failure."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillError(f"{path}: cannot read: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise DistillError(f"{path}: not valid {path.suffix[1:].upper()}{where}") from None


def _load_templates(spec: TaskSpec, base: Path) -> list[TemplateSpec]:
    """Inline templates, or a file holding a list (or {"templates": [...]}) of them."""
    if isinstance(spec.templates, list):
        if not spec.templates:
            raise DistillError(f"{spec.source}: templates: must not be empty")
        return spec.templates
    path = (base / spec.templates).resolve()
    if not path.is_file():
        raise DistillError(f"{spec.source}: templates: file not found: {path}")
    data = _read(path)
    items = data.get("templates") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items or not all(isinstance(t, dict) for t in items):
        raise DistillError(f"{path}: expected a non-empty list of templates, or {{\"templates\": [...]}}")
    keep = ("jinja", "name", "answer_choices", "id")  # promptsource files carry more metadata
    try:
        return [build(TemplateSpec, {k: v for k, v in t.items() if k in keep}, f"templates[{i}]")
                for i, t in enumerate(items)]
    except ConfigError as exc:
        raise DistillError(f"{path}: {exc}") from None


def _check(spec: TaskSpec) -> None:
    def need(cond: bool, key: str, message: str) -> None:
        if not cond:
            raise DistillError(f"{spec.source}: {key}: {message}")

    ds = spec.dataset
    need((ds.path is None) != (ds.hub is None), "dataset", "set exactly one of path (a local file) or hub (a Hub id)")
    need(spec.max_prompt_tokens is None or spec.max_prompt_tokens > 0, "max_prompt_tokens", "must be > 0")
    if spec.kind == "multiple_choice":
        need(spec.templates is not None, "templates", "required for kind multiple_choice")
        need(spec.truncate_chars is None or spec.truncate_chars > 0, "truncate_chars", "must be > 0")
        for i, t in enumerate(spec.template_list):
            need(t.answer_choices is not None or len(spec.choices) >= 2, f"templates[{i}]",
                 "has no answer_choices; set them or give `choices` (at least two)")
    else:
        need(spec.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {spec.max_new_tokens}")
        need(all(spec.stop), "stop", "stop strings must not be empty")
        need(spec.protocol is None, "protocol", "only multiple_choice tasks have a scoring protocol")


def load_task(name_or_path: str) -> TaskSpec:
    """Load and check a task spec by name (eval/tasks/<name>.yaml) or by path.

    Raises DistillError (one line, naming the file and key) for an unknown task,
    a missing or mistyped key, or a missing data/template file.
    """
    path = _find_spec(name_or_path)
    data = _read(path)
    if not isinstance(data, dict):
        raise DistillError(f"{path}: a task spec must be a mapping of keys to values")
    try:
        spec = build(TaskSpec, data)
    except ConfigError as exc:
        hint = ""
        if "expected a string, got True" in str(exc) or "expected a string, got False" in str(exc):
            hint = " (quote it: unquoted yes/no/true/false/on/off are booleans in YAML)"
        raise DistillError(f"{path}: {exc}{hint}") from None
    spec.source = str(path)
    spec.name = spec.name or path.stem
    if not plain_name(spec.name):  # it names the predictions file under the run directory
        raise DistillError(f"{path}: name: must be letters, digits, '.', '-' or '_', got {spec.name!r}")
    if isinstance(spec.dataset, str):
        spec.dataset = DatasetSpec(path=spec.dataset)
    base = path.parent
    if spec.dataset.path is not None:
        spec.data_path = (base / Path(spec.dataset.path).expanduser()).resolve()
        if not spec.data_path.is_file():
            raise DistillError(f"{path}: dataset.path: file not found: {spec.data_path}")
    if spec.templates is not None:
        spec.template_list = _load_templates(spec, base)
    _check(spec)
    return spec
