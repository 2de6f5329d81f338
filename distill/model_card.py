"""The model card of a published student, built with huggingface_hub's ModelCard / ModelCardData.

    card = build_card(recipe, "merged")      # a huggingface_hub.ModelCard; card.save(folder / "README.md")

Metadata: base_model (student.model when it is a Hub id), licence (below), library_name, tags,
datasets (the calibration sources that are Hub ids), and model-index (`eval_results`: the
student's accuracy per task from <run>/eval/scores.json, with its sample size and protocol in
each metric's args). Body: teachers, calibration data (from the cache manifest when there is
one), loss, budget and what the run used (train_result.json), the evaluation table with wall
time and peak memory (merge baselines beside the student), and the resolved recipe.

Licence rule (`licence`): publish.license, when set, is used as is. Otherwise each source
model's licence (the student's base, every teacher's model and adapter) is read offline from its
README front matter (`license:`) or its config.json (`license`); a Hub id is read from the local
Hugging Face cache only. All known and equal: that licence. Two or more different ones: `other`
(license_name `mixed`), each listed in the body. Any source unknown (and no disagreement):
`unknown`, the unknown ones named in the body. The student derives from every one of them, so a
licence is claimed only when all agree.

Secrets: the recipe holds no credentials, but a value that looks like one (a key named like
token/secret/password, a string holding a Hub token or the value of a credential variable of the
environment) is replaced by `<redacted>`, and the finished text is scrubbed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from distill.config import Recipe, looks_local, recipe_dict
from distill.report import is_student, primary
from distill.secrets import redact, scrub, secret_values

KINDS = {"multiple_choice": "Multiple choice (answer log-likelihood)",
         "generate_number": "Generation (numeric answer)", "generate_exact": "Generation (exact match)"}


# ---------------------------------------------------------------- licence


def model_licence(ref: str | None, revision: str | None = None) -> str | None:
    """`ref`'s licence from its README front matter or config.json, offline; None when unknown."""
    if not ref:
        return None
    for name in ("README.md", "config.json"):
        if looks_local(ref):
            path = Path(os.path.expanduser(ref)) / name
        else:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(ref, name, revision=revision)
            path = Path(hit) if isinstance(hit, str) else None
        if path is None or not path.is_file():
            continue
        try:
            if name == "README.md":
                from huggingface_hub import ModelCard

                found = ModelCard.load(path, ignore_metadata_errors=True).data.license
            else:
                found = json.loads(path.read_text()).get("license")
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str) and found.strip():
            return found.strip().lower()
    return None


def licence(recipe: Recipe) -> tuple[str, str | None, list[str]]:
    """(license, license_name, body lines) by the rule in the module docstring."""
    s = recipe.student
    sources = [(f"student base `{s.model}`", model_licence(s.model, s.revision))]
    for t in recipe.teachers:
        sources.append((f"teacher {t.name} `{t.model}`", model_licence(t.model, t.revision)))
        if t.adapter:
            sources.append((f"teacher {t.name}'s adapter `{t.adapter}`", model_licence(t.adapter)))
    listed = [f"- {what}: {lic or 'unknown (no licence in its README or config)'}" for what, lic in sources]
    known = {lic for _, lic in sources if lic}
    unknown = [what for what, lic in sources if not lic]
    if recipe.publish.license:
        return recipe.publish.license, None, [f"Licence `{recipe.publish.license}`, set by the recipe "
                                              "(publish.license). The models it derives from:", ""] + listed
    if len(known) > 1:
        return "other", "mixed", ["The models it derives from have different licences, so this card names "
                                  "`other` (`mixed`); the student is bound by each of them:", ""] + listed
    if unknown:
        return "unknown", None, [f"Licence unknown: {len(unknown)} of the models it derives from name none. "
                                 "Set publish.license once you know the terms:", ""] + listed
    return known.pop(), None, ["The licence is the one every model it derives from has:", ""] + listed


# ---------------------------------------------------------------- evaluation


def _task_dataset(task: str) -> dict:
    """EvalResult's dataset and task fields for a distill task; the task name alone if its spec is not one."""
    from distill.errors import DistillError
    from distill.evaluation.spec import load_task

    try:
        spec = load_task(task)
    except (DistillError, OSError, ValueError):
        return {"dataset_type": task, "dataset_name": task, "task_name": "Evaluation"}
    ds = spec.dataset if not isinstance(spec.dataset, str) else None
    if ds is not None and ds.hub:
        return {"dataset_type": ds.hub, "dataset_config": ds.name, "dataset_split": ds.split,
                "dataset_name": " ".join(x for x in (ds.hub, ds.name, ds.split) if x),
                "task_name": KINDS.get(spec.kind, spec.kind)}
    # A local copy (the offline BoolQ and MAWPS): named by its folder, and not claimed to be a Hub id.
    folder, file = (spec.data_path.parent.name, spec.data_path.name) if spec.data_path else (task, task)
    return {"dataset_type": folder, "dataset_name": f"{folder} (local copy, {file})",
            "task_name": KINDS.get(spec.kind, spec.kind)}


def eval_results(scores: dict) -> list:
    """The student's EvalResults: one accuracy per task; sample size and protocol in metric_args.

    Tasks over the same data (boolq and boolq_standard) share one model-index entry, so whatever
    tells them apart sits on the metric: its name, config (the task) and args."""
    from huggingface_hub import EvalResult

    out = []
    for task, m in scores.get("student", {}).items():
        acc = primary(m) if isinstance(m, dict) else None
        if acc is None:
            continue
        args = {"n": m.get("n"), "protocol": m.get("protocol")}  # multiple-choice tasks only
        out.append(EvalResult(task_type="text-generation", metric_type="accuracy", metric_value=round(acc, 4),
                              metric_name=f"{task} accuracy", metric_config=task,
                              metric_args={k: v for k, v in args.items() if v is not None}, **_task_dataset(task)))
    return out


# ---------------------------------------------------------------- body


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # a missing or hand-broken artifact: the card says less rather than failing


def _teachers(recipe: Recipe) -> list[str]:
    lines = ["## Teachers", "", "| teacher | model | revision | adapter | domains | weight | served |",
             "|---|---|---|---|---|---|---|"]
    for t in recipe.teachers:
        lines.append(f"| {t.name} | `{t.model}` | {t.revision or '-'} | {f'`{t.adapter}`' if t.adapter else '-'} | "
                     f"{', '.join(t.domains) or 'all'} | {t.weight} | {'online' if t.online else 'from the cache'} |")
    return lines


def _data(recipe: Recipe) -> list[str]:
    d = recipe.data
    lines = ["## Calibration data", "", "| source | split | format | domain | rows asked |", "|---|---|---|---|---|"]
    for s in d.sources:
        where = f"`{s.path}`" + (f" ({s.name})" if s.name else "")
        lines.append(f"| {where} | {s.split if not looks_local(s.path) else '-'} | {s.format} | "
                     f"{s.domain or (f'field `{s.domain_field}`' if s.domain_field else '-')} | "
                     f"{s.num_samples or 'all'}{' (shuffled)' if s.shuffle else ''} |")
    m = _read_json(Path(recipe.cache.dir) / "manifest.json")
    lines.append("")
    if m and isinstance(m.get("data"), dict):
        md = m["data"]
        lines.append(f"As cached: {md.get('summary', '')}; {md.get('samples')} samples, {md.get('tokens')} tokens, "
                     f"{md.get('targets')} distillation targets ({d.mask} tokens, at most {d.max_length} per sample).")
    else:
        lines.append(f"No cache manifest at `{recipe.cache.dir}`; the rows used are not recorded here.")
    return lines


def _loss(recipe: Recipe) -> list[str]:
    lo, c = recipe.loss, recipe.cache
    extra = {"jsd": f", beta {lo.beta}", "skew_kl": f", skew alpha {lo.skew_alpha}"}.get(lo.divergence, "")
    weighting = lo.weighting + (f" (temperature {lo.weighting_temperature})" if lo.weighting == "soft_ce" else "")
    return ["## Loss", "",
            f"Divergence `{lo.divergence}`{extra}, temperature {lo.temperature}; teacher weighting `{weighting}`; "
            f"cross-entropy mix {lo.ce_weight} (the rest is the distillation term). Teacher signal: up to {c.top_k} "
            f"tokens per position with the residual mass, codec `{c.codec}`."]


def _budget(recipe: Recipe) -> list[str]:
    t = recipe.train
    planned = f"{t.max_steps} optimizer steps" if t.max_steps else f"{t.epochs} epoch(s)"
    budget = (f"a wall-clock budget of {t.budget_minutes} min ({t.eval_reserve_minutes} min of it kept for eval)"
              if t.budget_minutes else "no wall-clock budget")
    lines = ["## Budget", "", f"Asked: {planned}, batch {t.batch_size} x {t.grad_accum} accumulation, lr {t.lr} "
             f"({t.schedule}), {budget}."]
    r = _read_json(Path(recipe.run_dir) / "train_result.json")
    if r:
        loss = f", final loss {r['final_loss']:.4f}" if isinstance(r.get("final_loss"), (int, float)) else ""
        wall = r.get("wall_s") or 0.0
        lines.append(f"Used: {r.get('steps')}/{r.get('planned_steps')} optimizer steps, {r.get('tokens')} target "
                     f"tokens, {wall:.1f} s ({wall / 60:.1f} min), stopped by {r.get('stopped_by')}{loss}.")
    else:
        lines.append("Used: not recorded (no train_result.json in the run).")
    return lines


def _role(recipe: Recipe, name: str) -> str:
    if is_student(name):
        return "student" if name == "student" else "student (variant)"
    merges = {m.name: m for m in recipe.eval.models if m.merge}
    if name in merges:
        return f"merge baseline ({merges[name].method} of {', '.join(merges[name].merge)})"
    return "teacher" if name in {t.name for t in recipe.teachers} else "model"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _evaluation(recipe: Recipe) -> list[str]:
    run = Path(recipe.run_dir)
    scores = _read_json(run / "eval" / "scores.json")
    if not scores:
        return ["## Evaluation", "", "Not evaluated (no eval/scores.json in the run)."]
    # The student first, then the merge baselines beside it, then everything else in scores.json's order.
    def rank(model: str) -> int:
        role = _role(recipe, model)
        return 0 if role == "student" else 1 if role.startswith("student") else 2 if role.startswith("merge") else 3

    models = sorted(scores, key=rank)
    limit = f"the first {recipe.eval.limit} examples of each task" if recipe.eval.limit else "every example"
    lines = ["## Evaluation", "", f"Accuracy on {limit}, multiple-choice protocol `{recipe.eval.protocol}` unless "
             "the row says otherwise; wall time and peak memory are each model's own pass over the task.", "",
             "| model | role | task | accuracy | n | wall s | peak MB |", "|---|---|---|---:|---:|---:|---:|"]
    for model in models:
        for task, m in scores[model].items():
            if not isinstance(m, dict):
                continue
            proto = f" ({m['protocol']})" if m.get("protocol") not in (None, recipe.eval.protocol) else ""
            lines.append(f"| {model} | {_role(recipe, model)} | {task}{proto} | {_num(primary(m), '.4f')} | "
                         f"{m.get('n', '-')} | {_num(m.get('wall_s'), '.1f')} | {_num(m.get('peak_mem_mb'), '.0f')} |")
    report = _read_json(run / "report.json") or {}
    best, diffs = report.get("best_merge"), (report.get("vs_best_merge") or {}).get("student") or {}
    if best and diffs.get("mean"):
        d = diffs["mean"]
        lines += ["", f"Student - best merge ({best}) on the mean, paired on the same examples: {d['diff']:+.3f} "
                      f"[{d['low']:+.3f}, {d['high']:+.3f}] (95% interval, n={d['n']})."]
    return lines


def _usage(repo: str, recipe: Recipe, fmt: str, chat: bool) -> list[str]:
    if fmt == "adapter":
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "from peft import PeftModel", "",
                f'base = AutoModelForCausalLM.from_pretrained("{recipe.student.model}")',
                f'model = PeftModel.from_pretrained(base, "{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    else:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    note = "The tokenizer carries the chat template it was trained with." if chat else \
        "The tokenizer has no chat template; prompts are plain text."
    return ["## Use", "", "```python", *code, "```", "", note]


def _base(recipe: Recipe, fmt: str) -> tuple[str | None, list[str]]:
    """(the card's base_model, the sentence saying what the student started from)."""
    s = recipe.student
    init = (f", then set to the {s.init.method} merge of {', '.join(s.init.merge)}" if s.init else "")
    kind = "LoRA adapter over" if fmt == "adapter" else ("LoRA, merged into" if s.lora else "full fine-tune of")
    rev = f" (revision {s.revision})" if s.revision else ""
    if looks_local(s.model):
        return None, [f"Student: {kind} a local model folder `{Path(s.model).name}`{rev}{init}. It is not a Hub id, "
                      "so the card names no `base_model`."]
    return s.model, [f"Student: {kind} [`{s.model}`](https://huggingface.co/{s.model}){rev}{init}."]


def build_card(recipe: Recipe, fmt: str, chat_template: bool = False):
    """The huggingface_hub.ModelCard for <run>/publish/README.md; `fmt` is publish.format."""
    from huggingface_hub import ModelCard, ModelCardData

    secrets = secret_values()
    repo = recipe.publish.repo_id or recipe.name
    base, base_lines = _base(recipe, fmt)
    lic, lic_name, lic_lines = licence(recipe)
    scores = _read_json(Path(recipe.run_dir) / "eval" / "scores.json") or {}
    results = eval_results(scores)
    tags = ["distill", "knowledge-distillation", "multi-teacher"] + (["model-merging"] if recipe.student.init else [])
    data = ModelCardData(
        base_model=base, license=lic, license_name=lic_name, library_name="peft" if fmt == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags + (["lora", "peft"] if fmt == "adapter" else []),
        datasets=[s.path for s in recipe.data.sources if not looks_local(s.path)] or None,  # Hub ids only
        # model-index needs a model name; without results there is no model-index at all
        model_name=repo.split("/")[-1] if results else None, eval_results=results or None,
        metrics=["accuracy"] if results else None)
    recipe_yaml = yaml.safe_dump(redact(recipe_dict(recipe), secrets), sort_keys=False).strip()
    body = [f"# {repo}", "",
            f"A student distilled from {len(recipe.teachers)} teacher model(s) with distill, a multi-teacher "
            "knowledge-distillation trainer (teachers' sparse next-token distributions cached once, then one student "
            "trained on all of them).", "", *base_lines, "", *_usage(repo, recipe, fmt, chat_template), "",
            *_teachers(recipe), "", *_data(recipe), "", *_loss(recipe), "", *_budget(recipe), "",
            *_evaluation(recipe), "",
            "## Licence", "", *lic_lines, "", "## Recipe", "", "The resolved recipe this run was made with "
            "(credential-like values redacted):", "", "```yaml", recipe_yaml, "```", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(scrub(text, secrets))
