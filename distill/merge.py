"""Weight merges of teachers (linear, TIES, DARE), through peft's merge maths (`peft.utils.merge_utils`).

Each expert's task vector is its weights minus the base's (a LoRA expert is merged into its base
first, so over its own base its vector is its LoRA delta, zero off the adapted layers); the merge is
base + method(vectors), tensor by tensor. With no base (a linear merge whose weights sum to 1) the
vectors are the weights themselves: sum(w_i * theta_i) = base + sum(w_i * (theta_i - base)).

Why task vectors and not `add_weighted_adapter` for LoRA experts: the only exact combination it
offers is `cat` (a weighted sum, rank = sum of the ranks). Its `linear`, `ties` and `dare_*` combine
the A and B factors separately (so B_i A_j cross terms appear, ranks must be equal, and TIES prunes
the factors, not the weight deltas), and its `*_svd` types compute the merge of the deltas, exactly as
here, then truncate it to a rank. A baseline has no rank to meet, so it takes the exact merge; a LoRA
student started from a merge (`student.init`, see `merged_adapter`) needs one adapter of its own rank
and takes `add_weighted_adapter`'s SVD at that rank, the best fit of that rank to the same merge.

Every expert is loaded in float32, one at a time; memory holds the base and n task vectors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft.utils import merge_utils

from distill.config import MergeConfig, Recipe, TeacherConfig
from distill.errors import DistillError
from distill.models import adapter_source, load_model, load_tokenizer, save_pretrained
from distill.schema import to_dict

_MERGERS = {
    "linear": lambda v, w, m: merge_utils.task_arithmetic(v, w),
    "ties": lambda v, w, m: merge_utils.ties(v, w, m.density, m.majority_sign_method),
    "dare_linear": lambda v, w, m: merge_utils.dare_linear(v, w, m.density),
    "dare_ties": lambda v, w, m: merge_utils.dare_ties(v, w, m.density, m.majority_sign_method),
}


def merge_tensors(vectors: list[torch.Tensor], m: MergeConfig) -> torch.Tensor:
    """n task vectors of one shape -> their merge (that shape), by `m.method` with `m.weights`.

    DARE draws its masks from torch's global generator: callers seed it (see `merged_model`)."""
    weights = torch.tensor(m.weights, dtype=vectors[0].dtype, device=vectors[0].device)
    with warnings.catch_warnings():  # density 1 (no pruning) is a valid choice, not worth a warning per tensor
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        return _MERGERS[m.method](vectors, weights, m)


def _materialise(t: TeacherConfig, recipe: Recipe):
    model = load_model(t.model, revision=t.revision, gguf_file=t.gguf_file, dtype="float32",
                       adapter=t.adapter, trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle,
                       what=f"teacher {t.name}")
    if t.adapter:
        model = model.merge_and_unload()
    return model


def _load_base(recipe: Recipe, ref: str):
    # A base named by a teacher's `model` loads as that teacher does (revision, GGUF file).
    like = next((t for t in recipe.teachers if t.model == ref), None)
    return load_model(ref, revision=like and like.revision, gguf_file=like and like.gguf_file, dtype="float32",
                      trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle, what="merge base")


def _floats(model) -> dict[str, torch.Tensor]:
    """Floating-point tensors of the state dict, one key per storage (a tied head is the embedding)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def merged_model(recipe: Recipe, m: MergeConfig, what: str):
    """The merge of `m.merge` as a float32 model (the base's, or with no base the last expert's, modules)."""
    teachers = {t.name: t for t in recipe.teachers}
    holder = _load_base(recipe, m.base) if m.base else None
    base = {k: v.detach().clone() for k, v in _floats(holder).items()} if holder is not None else None
    vectors: list[dict[str, torch.Tensor]] = []
    for name in m.merge:
        model = _materialise(teachers[name], recipe)
        state = _floats(model)
        ref = base if base is not None else (vectors[0] if vectors else state)
        if state.keys() != ref.keys() or any(state[k].shape != ref[k].shape for k in ref):
            raise DistillError(f"{what}: cannot merge {m.merge}: teacher {name} has other parameters than "
                               f"{'the base ' + m.base if base is not None else m.merge[0]}")
        vectors.append({k: v.detach() - base[k] if base is not None else v.detach() for k, v in state.items()})
        holder = holder if base is not None else model
        del model, state
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed)  # DARE's drop masks, drawn tensor by tensor in state-dict order
        for k, target in _floats(holder).items():
            merged = merge_tensors([v[k] for v in vectors], m)
            target.copy_(merged if base is None else base[k] + merged)
    return holder


def merge_experts(recipe: Recipe, m: MergeConfig, out: Path, log=print) -> Path:
    """Write the merge of `m.merge` to `out` (a model folder); reused while the same merge made it."""
    teachers = {t.name: t for t in recipe.teachers}
    spec = {k: getattr(m, k) for k in MergeConfig.__dataclass_fields__}  # not an eval entry's name or model
    stamp = {"merge": spec, "teachers": [to_dict(teachers[n]) for n in m.merge]}
    record = out / "merge.json"
    if (out / "config.json").exists() and record.exists() and json.loads(record.read_text()) == stamp:
        return out
    model = merged_model(recipe, m, f"merge {out.name}")
    first = teachers[m.merge[0]]
    tok = load_tokenizer(first.model, revision=first.revision, gguf_file=first.gguf_file,
                         trust_remote_code=recipe.trust_remote_code)
    save_pretrained(model, tok, out)
    record.write_text(json.dumps(stamp, indent=1) + "\n")  # last: a folder without it is rebuilt
    log(f"merge: {m.method} of {', '.join(m.merge)} -> {out}")
    return out


# peft's combination type for an adapter of a given rank: the merge of the deltas, SVD-truncated.
_SVD_TYPES = {"linear": "svd", "ties": "ties_svd", "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd"}


def init_from_merge(recipe: Recipe, model) -> None:
    """Start the student where `student.init`'s merge ends (in place, before training).

    Full student: its weights become the merged weights (`merged_model`). LoRA student (a PeftModel
    with its trainable adapter "default", rank r, scaling s = alpha / r): the experts' adapters are
    loaded beside it, `add_weighted_adapter` merges their deltas and keeps the best rank-r fit (SVD;
    exact for linear when r >= the sum of the experts' ranks), and "default" takes it as A / sqrt(s),
    B / sqrt(s), so s * B @ A is that fit. The expert and merged adapters are then deleted."""
    m = recipe.student.init
    if not hasattr(model, "peft_config"):
        merged = _floats(merged_model(recipe, m, "student.init"))
        target = _floats(model)
        if merged.keys() != target.keys() or any(merged[k].shape != target[k].shape for k in target):
            raise DistillError(f"student.init: the merge of {m.merge} has other parameters than student.model")
        with torch.no_grad():
            for k, t in target.items():
                t.copy_(merged[k])
        return
    teachers = {t.name: t for t in recipe.teachers}
    names = [f"init_{n}" for n in m.merge]
    for name, adapter in zip(m.merge, names):
        model.load_adapter(adapter_source(teachers[name].adapter, f"teacher {name} adapter", recipe.allow_pickle),
                           adapter_name=adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed)
        model.add_weighted_adapter(names, m.weights, "init_merged", combination_type=_SVD_TYPES[m.method],
                                   svd_rank=recipe.student.lora.r, density=m.density,
                                   majority_sign_method=m.majority_sign_method or "total")
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if "init_merged" not in getattr(module, "lora_A", {}):
                continue
            if "default" not in module.lora_A:
                raise DistillError(f"student.init: the experts adapt {module_name}, which student.lora.target_modules "
                                   f"({recipe.student.lora.target_modules}) leaves out; add it there")
            root = module.scaling["default"] ** 0.5
            module.lora_A["default"].weight.copy_(module.lora_A["init_merged"].weight / root)
            module.lora_B["default"].weight.copy_(module.lora_B["init_merged"].weight / root)
    for adapter in (*names, "init_merged"):
        model.delete_adapter(adapter)
    model.set_adapter("default")
