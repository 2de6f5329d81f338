"""Bad input, fuzzed with hypothesis (docs/reliability.md): the recipe loader, `key=value` overrides,
the calibration data loaders and the task specs either load or raise DistillError (the CLI's one-line
error, exit 2) naming the file, and the line or key where one is at fault. Never another exception.

Derandomized (the same examples on every run, so CI never flakes) and without an example database.
"""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_recipe
from distill.config import DataConfig, SourceConfig, load_recipe
from distill.data import load_samples
from distill.errors import DistillError
from distill.evaluation import build_examples, load_task

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values of every JSON type, and strings that look like what a user types by mistake.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["", " ", "1e-3", "yes", "null", "[1, 2", "{a: 1}",
                                                           "../../etc", "\x00", "é" * 5, "{name}", "{run_dir}"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
RECIPE_KEYS = ["name", "run_dir", "seed", "teachers", "student", "data", "cache", "loss", "train", "eval", "publish",
               "wandb", "trust_remote_code", "allow_pickle", "tokenizer"]
SUB_KEYS = ["model", "name", "lr", "batch_size", "sources", "path", "top_k", "codec", "divergence", "weighting",
            "max_steps", "tasks", "models", "merge", "method", "weights", "density", "lora", "r", "init", "domains",
            "adapter", "dtype", "epochs", "limit", "repo_id", "format", "max_length", "num_samples", "0", "1"]


def _check(exc: DistillError, *names: str) -> None:
    """A user-facing error: it names one of `names` (the file, a key) and is one line once printed."""
    text = " ".join(str(exc).split())
    assert text and any(n in text for n in names), (text, names)


@pytest.fixture(scope="module")
def valid(tiny_world, tmp_path_factory) -> dict:
    """A recipe that loads, as a dict, to mutate."""
    root = tmp_path_factory.mktemp("fuzz")
    return tiny_recipe(tiny_world, root / "run")


def _mutate(base: dict, draw_path: list[str], value) -> dict:
    recipe = json.loads(json.dumps(base))
    node = recipe
    for part in draw_path[:-1]:
        nxt = node.get(part) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[draw_path[-1]] = value
    return recipe


@FUZZ
@given(path=st.lists(st.sampled_from(RECIPE_KEYS + SUB_KEYS), min_size=1, max_size=3), value=json_values)
def test_recipe_with_any_value_anywhere_loads_or_names_the_key(valid, tmp_path, path, value):
    recipe = _mutate(valid, path, value)
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(f)
    except DistillError as exc:
        _check(exc, str(f))


@FUZZ
@given(raw=st.one_of(st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300),
                     st.builds(lambda a, b: (a + b).encode("utf-8", "surrogatepass"),
                               st.sampled_from(["name: x\n", "teachers:\n  - ", "student: ", "a: [1, 2\n", "- 1\n",
                                                "\t\x00"]), st.text(max_size=80))))
def test_any_recipe_bytes_load_or_name_the_file(tmp_path, raw):
    f = tmp_path / "r.yaml"
    f.write_bytes(raw)
    try:
        load_recipe(f)
    except DistillError as exc:
        _check(exc, str(f))


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.lists(st.sampled_from(RECIPE_KEYS + SUB_KEYS), min_size=1, max_size=3)
              .map(".".join), st.text(max_size=20)),
    st.text(max_size=30)), max_size=3))
def test_any_override_loads_or_names_it(valid, tmp_path, overrides):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(valid))
    try:
        load_recipe(f, overrides)
    except DistillError as exc:
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        _check(exc, str(f), *[k for k in keys if k], *overrides)


# ---------------------------------------------------------------- calibration data

rows = st.one_of(
    st.fixed_dictionaries({"prompt": scalars, "response": scalars}),
    st.fixed_dictionaries({"prompt": st.text(max_size=20)}),
    st.dictionaries(st.sampled_from(["prompt", "response", "text", "messages", "domain", "x"]), json_values,
                    max_size=4),
    st.fixed_dictionaries({"messages": json_values}),
    json_values,
)
lines = st.one_of(rows.map(json.dumps), st.text(max_size=40), st.just("{"), st.just(""),
                  st.builds(lambda n: json.dumps({"prompt": "x" * n, "response": "y" * n}), st.integers(0, 20_000)))


@FUZZ
@given(body=st.lists(lines, max_size=8), junk=st.binary(max_size=16), fmt=st.sampled_from(
    ["prompt_response", "text", "chat"]), ext=st.sampled_from([".jsonl", ".json"]))
def test_any_data_file_loads_or_names_file_and_line(tiny_world, tmp_path, body, junk, fmt, ext):
    f = tmp_path / f"data{ext}"
    raw = ("\n".join(body) if ext == ".jsonl" else "[" + ",".join(body) + "]").encode() + junk
    f.write_bytes(raw)
    cfg = DataConfig(sources=[SourceConfig(path=str(f), format=fmt)], max_length=32)
    try:
        samples, _ = load_samples(tiny_world["tok"], cfg)
        assert samples and all(any(s.target_mask) for s in samples)
    except DistillError as exc:
        _check(exc, str(f), "data.sources")


# ---------------------------------------------------------------- task specs

spec_fields = st.fixed_dictionaries({}, optional={
    "kind": st.one_of(st.sampled_from(["multiple_choice", "generate_number", "generate_exact", "other"]), scalars),
    "dataset": st.one_of(st.just("t.jsonl"), st.just("missing.jsonl"), json_values),
    "prompt": st.one_of(st.sampled_from(["{{ question }}", "{{ q", "{% if %}", "Q: {{ passage }}"]), scalars),
    "choices": st.one_of(st.just(["no", "yes"]), json_values),
    "answer_choices": st.one_of(st.just("no ||| yes"), scalars),
    "label_field": st.one_of(st.just("label"), scalars),
    "target_field": st.one_of(st.just("target"), scalars),
    "max_new_tokens": st.one_of(st.integers(-2, 10), scalars),
    "name": st.one_of(st.just("t"), scalars),
    "protocol": scalars,
})


@FUZZ
@given(spec=spec_fields, body=st.lists(lines, max_size=5))
def test_any_task_spec_loads_or_names_the_file(tmp_path, spec, body):
    (tmp_path / "t.jsonl").write_text("\n".join(body))
    f = tmp_path / "task.yaml"
    f.write_text(yaml.safe_dump(spec))
    try:
        build_examples(load_task(str(f)), limit=3)
    except DistillError as exc:
        _check(exc, str(f), str(tmp_path / "t.jsonl"), "t.jsonl", str(tmp_path))
