"""Task specs and examples: shipped tasks, BoolQ rendering against the competition's prompts, bad input."""

import json
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.evaluation import build_examples, list_tasks, load_task
from distill.evaluation.spec import TASKS_DIR

REFERENCE = Path(__file__).parent / "data" / "boolq_reference_prompts.jsonl"


def reference_rows():
    rows = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    assert len(rows) == 35
    return rows


def test_first_20_boolq_prompts_equal_the_competition_prompts():
    examples = build_examples(load_task("boolq"), limit=20)
    refs = [r for r in reference_rows() if r["example_idx"] < 20]
    assert len(examples) == len(refs) == 20
    for ex, ref in zip(examples, refs):
        assert ex.prompt == ref["input"], ex.index
        assert list(ex.choices) == ref["answer_choices"]
        assert ex.label == ref["label"]
        assert ex.target == ref["target"]
        assert ex.template == ref["template_name"]


def test_truncated_boolq_prompts_equal_the_competition_prompts():
    # The 15 passages over 2,048 characters exercise promptsource's jinja truncate (leeway 5, "...").
    examples = build_examples(load_task("boolq"))
    assert len(examples) == 3270
    long = [r for r in reference_rows() if r["example_idx"] >= 20]
    assert len(long) == 15
    for ref in long:
        ex = examples[ref["example_idx"]]
        assert ex.prompt == ref["input"]
        assert "..." in ex.prompt


def test_boolq_templates_round_robin_sorted_by_name():
    spec = load_task("boolq")
    names = [t.name for t in spec.template_list]
    assert len(names) == 10 and names == sorted(names)
    examples = build_examples(spec, limit=30)
    assert [ex.template for ex in examples] == [names[i % 10] for i in range(30)]
    true_false = {ex.template for ex in examples if ex.choices == ("False", "True")}
    assert true_false == {"after_reading", "exercise", "valid_binary"}


def test_limit_is_the_first_n_rows_with_their_full_run_templates():
    full = build_examples(load_task("boolq"))
    subset = build_examples(load_task("boolq"), limit=13)
    assert [e.index for e in subset] == list(range(13))
    assert subset == full[:13]


def test_hub_style_int_labels_render_the_same(tmp_path):
    # Hub super_glue/boolq has int labels; the local copy has "true"/"false" strings.
    rows = [json.loads(line) for line in (TASKS_DIR.parent / "data/boolq/val.jsonl").read_text().splitlines()[:10]]
    for r in rows:
        r["label"] = int(r["label"] == "true")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec_text = (TASKS_DIR / "boolq_hub.yaml").read_text()
    templates = (TASKS_DIR.parent / "data/boolq/promptsource_templates.json").resolve()
    spec_text = spec_text.replace("hub: super_glue\n  name: boolq\n  split: validation", "path: rows.jsonl")
    spec_text = spec_text.replace("../data/boolq/promptsource_templates.json", str(templates))
    (tmp_path / "hubstyle.yaml").write_text(spec_text)
    assert build_examples(load_task(str(tmp_path / "hubstyle.yaml"))) == build_examples(load_task("boolq"), limit=10)


def test_every_shipped_task_loads():
    names = list_tasks()
    assert {"boolq", "boolq_hub", "mawps", "mawps_hub"} <= set(names)
    for name in names:
        spec = load_task(name)
        assert spec.name == name
        if spec.dataset.hub is None:  # Hub tasks need network to read rows
            assert build_examples(spec, limit=3)


def test_mawps_shipped_task():
    spec = load_task("mawps")
    assert spec.kind == "generate_number" and spec.max_new_tokens == 64
    examples = build_examples(spec)
    assert len(examples) == 237
    assert examples[0].prompt == "There are 4 crayons in each box . How many crayons are in 3 boxes ?"
    assert examples[0].target == "12.0"


def test_boolq_standard_is_boolq_under_the_standard_protocol():
    import yaml

    a = yaml.safe_load((TASKS_DIR / "boolq.yaml").read_text())
    b = yaml.safe_load((TASKS_DIR / "boolq_standard.yaml").read_text())
    assert b.pop("protocol") == "standard" and "protocol" not in a
    for key in ("name", "description"):
        a.pop(key), b.pop(key)
    assert a == b  # same rows, templates, truncation and tokenization
    assert [e.prompt for e in build_examples(load_task("boolq_standard"), 20)] == \
        [e.prompt for e in build_examples(load_task("boolq"), 20)]


def test_protocol_is_for_multiple_choice_tasks_only(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "target": "2"}\n')
    spec = write(tmp_path / "g.yaml", "kind: generate_exact\ndataset: d.jsonl\nprotocol: standard\n")
    with pytest.raises(DistillError, match=r"g.yaml: protocol: only multiple_choice tasks"):
        load_task(spec)
    bad = write(tmp_path / "m.yaml", "kind: multiple_choice\ndataset: d.jsonl\nprotocol: fancy\n"
                "templates: [{jinja: 'x ||| y', answer_choices: 'a ||| b'}]\n")
    with pytest.raises(DistillError, match=r"m.yaml: .*protocol"):
        load_task(bad)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_generate_exact_spec_by_path_resolves_data_against_its_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "add.jsonl").write_text('{"prompt": "1+1=", "target": "2"}\n{"prompt": "2+2=", "target": " 4"}\n')
    spec_path = write(run / "add.yaml", "kind: generate_exact\ndataset: add.jsonl\nmax_new_tokens: 3\nstop: [';']\n")
    monkeypatch.chdir(tmp_path)  # a different working directory must not matter
    spec = load_task(spec_path)
    assert spec.name == "add" and spec.data_path == (run / "add.jsonl").resolve()
    examples = build_examples(spec)
    assert [(e.prompt, e.target) for e in examples] == [("1+1=", "2"), ("2+2=", " 4")]


def test_configurable_fields_and_prompt_template(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "abc", "a": "cba"}\n')
    spec = load_task(write(tmp_path / "rev.yaml", "kind: generate_exact\ndataset: {path: d.jsonl}\n"
                           "prompt_template: 'reverse {{ q }}:'\ntarget_field: a\n"))
    assert build_examples(spec)[0].prompt == "reverse abc:"
    spec = load_task(write(tmp_path / "rev2.yaml", "kind: generate_exact\ndataset: d.jsonl\n"
                           "prompt_field: q\ntarget_field: a\n"))
    assert build_examples(spec)[0].prompt == "abc"


def one_line_error(fn, *words):
    with pytest.raises(DistillError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_unknown_task():
    one_line_error(lambda: load_task("no_such_task"), "no_such_task", "unknown task", "boolq")


def test_missing_spec_file(tmp_path):
    one_line_error(lambda: load_task(str(tmp_path / "gone.yaml")), "gone.yaml", "not found")


def test_missing_required_key(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "target": "b"}\n')
    path = write(tmp_path / "t.yaml", "dataset: d.jsonl\n")
    one_line_error(lambda: load_task(path), "t.yaml", "kind", "missing required key")


def test_misspelt_key_and_bad_value(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "target": "b"}\n')
    path = write(tmp_path / "t.yaml", "kind: generate_exact\ndataset: d.jsonl\nmax_new_token: 3\n")
    one_line_error(lambda: load_task(path), "t.yaml", "max_new_token", "unknown key")
    path = write(tmp_path / "u.yaml", "kind: generate_maybe\ndataset: d.jsonl\n")
    one_line_error(lambda: load_task(path), "u.yaml", "kind", "generate_exact")
    path = write(tmp_path / "v.yaml", "kind: generate_exact\ndataset: d.jsonl\nmax_new_tokens: 0\n")
    one_line_error(lambda: load_task(path), "v.yaml", "max_new_tokens", "> 0")


def test_missing_data_file(tmp_path):
    path = write(tmp_path / "t.yaml", "kind: generate_exact\ndataset: nowhere.jsonl\n")
    one_line_error(lambda: load_task(path), "t.yaml", "dataset.path", "nowhere.jsonl")


def test_missing_field_in_the_data(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    spec = load_task(write(tmp_path / "t.yaml", "kind: generate_exact\ndataset: d.jsonl\n"))
    one_line_error(lambda: build_examples(spec), "d.jsonl", "row 1", "'target'")
    # A field used only inside a template is checked too (jinja would render it as "").
    spec = load_task(write(tmp_path / "m.yaml", "kind: multiple_choice\ndataset: d.jsonl\nchoices: [x, y]\n"
                           "label_field: target\nlabel_map: {b: 1}\n"
                           "templates: [{jinja: '{{ prompt }} {{ context }} ||| {{ answer_choices[target] }}'}]\n"))
    one_line_error(lambda: build_examples(spec), "row 0", "'context'")


def test_bad_rows(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "target": "b"}\n{not json\n')
    spec = load_task(write(tmp_path / "t.yaml", "kind: generate_exact\ndataset: d.jsonl\n"))
    one_line_error(lambda: build_examples(spec), "d.jsonl", "line 2")
    (tmp_path / "n.jsonl").write_text('{"question": "q", "answer": "twelve"}\n')
    spec = load_task(write(tmp_path / "n.yaml", "kind: generate_number\ndataset: n.jsonl\n"
                           "prompt_field: question\ntarget_field: answer\n"))
    one_line_error(lambda: build_examples(spec), "row 0", "twelve", "not a number")
    (tmp_path / "e.jsonl").write_text("")
    spec = load_task(write(tmp_path / "e.yaml", "kind: generate_exact\ndataset: e.jsonl\n"))
    one_line_error(lambda: build_examples(spec), "no examples")


def test_bad_label(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "maybe"}\n')
    spec = load_task(write(tmp_path / "t.yaml", "kind: multiple_choice\ndataset: d.jsonl\nchoices: ['no', 'yes']\n"
                           "label_map: {'no': 0, 'yes': 1}\ntemplates: [{jinja: '{{ text }}'}]\n"))
    one_line_error(lambda: build_examples(spec), "row 0", "maybe")
    # Unquoted No/Yes are booleans in YAML: say so.
    path = write(tmp_path / "u.yaml", "kind: multiple_choice\ndataset: d.jsonl\nchoices: [No, Yes]\n"
                 "templates: [{jinja: '{{ text }}'}]\n")
    one_line_error(lambda: load_task(path), "choices[0]", "quote it")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path / "t.yaml", "kind: [unclosed\n")
    one_line_error(lambda: load_task(path), "t.yaml", "not valid YAML")
