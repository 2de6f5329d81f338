"""Render prompts the way promptsource (and so the LLM-Merging starter kit) did.

promptsource `Template.apply` semantics, reproduced so BoolQ prompts match the
competition's byte for byte (checked against the reference file in the tests):

- every `}}` becomes `| string | truncate(N) }}`: each variable is cut to N
  characters (jinja's `truncate`: whole words, "..." appended, and a leeway of
  5, so strings up to N + 5 characters are left alone);
- the answer choices are rendered first, split on `|||` and stripped, and
  passed to the template as `answer_choices`;
- the output is split on `|||` into (input, target), each part stripped.

We render in jinja's sandbox: task files and Hub data are user input, and the
sandbox renders these templates identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from jinja2 import BaseLoader, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from distill.errors import DistillError

_ENV = SandboxedEnvironment(loader=BaseLoader)
_SEP = "|||"
# promptsource hides "|||" inside example values so it cannot split the output.
_PIPE_STANDIN = "3ed2dface8203c4c9dfb1a5dc58e41e0||"


@lru_cache(maxsize=256)
def _compile(source: str):
    return _ENV.from_string(source)


@dataclass(frozen=True)
class Rendered:
    prompt: str
    target: str  # what the template says the answer is ("" when it has no target part)
    choices: tuple[str, ...]


def render(jinja: str, answer_choices: Optional[str], variables: dict[str, Any],
           truncate_chars: Optional[int] = None, where: str = "template") -> Rendered:
    """Render one promptsource-style template for one example.

    jinja: the template; `|||` separates the prompt from the target.
    answer_choices: a jinja string such as "No ||| Yes", or None.
    truncate_chars: promptsource's TEXT_VAR_LENGTH (2048), or None for no truncation.
    """
    variables = {k: v.replace(_SEP, _PIPE_STANDIN) if isinstance(v, str) else v
                 for k, v in variables.items()}
    source = jinja
    if truncate_chars is not None:
        source = source.replace("}}", f" | string | truncate({int(truncate_chars)}) }}}}")
    try:
        choices: tuple[str, ...] = ()
        if answer_choices is not None:
            choices = tuple(p.strip() for p in _compile(answer_choices).render(**variables).split(_SEP))
        parts = _compile(source).render(**variables, answer_choices=list(choices)).split(_SEP)
    except TemplateError as exc:
        raise DistillError(f"{where}: cannot render: {type(exc).__name__}: {exc}") from None
    parts = [p.replace(_PIPE_STANDIN, _SEP).strip() for p in parts]
    choices = tuple(c.replace(_PIPE_STANDIN, _SEP) for c in choices)
    return Rendered(prompt=parts[0], target=parts[1] if len(parts) > 1 else "", choices=choices)


def render_choices(answer_choices: str, variables: dict[str, Any], where: str = "answer_choices") -> tuple[str, ...]:
    """The answer choices alone (promptsource's `get_answer_choices_list`)."""
    return render("", answer_choices, variables, None, where).choices


def render_text(jinja: str, variables: dict[str, Any], where: str = "prompt_template") -> str:
    """Render a plain jinja string (no `|||`, no truncation, not stripped)."""
    try:
        return _compile(jinja).render(**variables)
    except TemplateError as exc:
        raise DistillError(f"{where}: cannot render: {type(exc).__name__}: {exc}") from None
