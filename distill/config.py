"""The recipe: one YAML file describes one run. Every field is documented here, once.

Load with `load_recipe(path, overrides)`; overrides are `key.sub=value` strings
(list items by index: `teachers.0.weight=2`), values parsed as YAML. Validation
happens entirely at load time, so a bad recipe fails before any compute.

Strings may contain `{run_dir}` (the run directory), `{recipe_dir}` (the
folder holding the recipe) and `{smollm2}` (the embedded SmolLM2-135M-Instruct
folder, converted from its PyPI wheel on first use; see distill/smollm.py); they
are substituted after overrides.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distill.errors import ConfigError
from distill.schema import build, to_dict

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
# "min_ce" is the pre-split name, kept only so that validate() can say what replaced it.
Weighting = Literal["fixed", "route", "min_ce_sequence", "min_ce_token", "soft_ce", "min_ce"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TeacherConfig:
    name: str  # unique short name, used in the cache and in logs
    model: str  # local path or Hub id of a full model (the base, when `adapter` is set)
    revision: Optional[str] = None  # Hub revision (branch, tag or commit)
    adapter: Optional[str] = None  # PEFT LoRA adapter (path or Hub id) applied over `model`
    gguf_file: Optional[str] = None  # load `model` from this GGUF file inside it (dequantized)
    dtype: DType = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    quantization: Literal["none", "4bit", "8bit"] = "none"  # bitsandbytes loading
    weight: float = 1.0  # fixed weight in the multi-teacher loss (normalised per token)
    domains: list[str] = field(default_factory=list)  # routing tags this teacher serves; empty = all
    # Online distillation: `distill cache` writes no records for this teacher (tokens only) and
    # `distill train` runs it on every micro-batch instead, through the same top-k and codec, so its
    # signal is the one the cache would hold. Costs a teacher forward per step; saves the disk and
    # the capture. Changing it means re-running `distill cache` (the manifest records it).
    online: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]


@dataclass
class MergeConfig:
    """A weight merge of teachers (distill/merge.py, through peft.utils.merge_utils): an eval baseline
    (`eval.models[]`) or the student's starting point (`student.init`).

    Each expert's task vector is its weights minus `base` (a LoRA expert's is its delta); the merge
    is base + method(task vectors). linear: sum of weight * vector. ties: keep each vector's top
    `density` fraction by magnitude, elect a sign per weight (majority_sign_method), average the
    weighted entries that agree with it. dare_linear / dare_ties: drop entries at random (keep with
    probability `density`, rescale by 1/density; seeded by `seed`, so repeatable), then sum / ties.
    """

    merge: list[str] = field(default_factory=list)  # teacher names
    method: MergeMethod = "linear"
    # One per teacher in `merge`; null = 1/n each for linear and dare_linear (the uniform average),
    # 1.0 each for ties and dare_ties (their disjoint mean already averages). Resolved on load.
    weights: Optional[list[float]] = None
    density: Optional[float] = None  # fraction of each task vector kept, in (0, 1]; ties and dare_* only
    majority_sign_method: Optional[Literal["total", "frequency"]] = None  # ties, dare_ties; null = total
    # Model the task vectors are taken from (path or Hub id). null = the LoRA experts' shared base;
    # full fine-tunes need one, except for a linear merge whose weights sum to 1 (base-free then).
    base: Optional[str] = None
    seed: int = 0  # dare_*: seeds the random drop mask


@dataclass
class StudentConfig:
    model: str  # local path or Hub id; often the shared base of the experts
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    # The dtype the student is loaded in. Trainable weights are then held in fp32 whatever this says
    # (master weights, with fp32 optimizer state; compute runs under train.mixed_precision's autocast),
    # unless train.pure_bf16. auto: float32 for a full student (its weights are the master weights,
    # so they are loaded once, straight into fp32); for a LoRA student the frozen base's dtype,
    # bfloat16 on CUDA and float32 elsewhere (the adapters are fp32); under DeepSpeed its bf16/fp16
    # dtype when enabled (DeepSpeed casts the module and keeps its own fp32 master copy).
    dtype: DType = "auto"
    lora: Optional[LoraConfig] = None  # train LoRA adapters instead of all weights
    max_params: float = 8.0e9  # refuse students above this many parameters (the competition's rule)
    gradient_checkpointing: bool = False
    # Start from a merge of teachers (merge, then distill), e.g. {merge: [math, qa], method: ties,
    # density: 0.5}. Full student: its weights are the merged weights. LoRA student: its adapter starts
    # as the merged adapter (experts: LoRA adapters over student.model), best rank-`lora.r` fit by SVD.
    init: Optional[MergeConfig] = None


@dataclass
class GenerateConfig:
    """Prompt-only data: a teacher writes each response before capture (see README, Calibration data).

    Responses are generated once, stored in the cache directory (`generated/`), and then scored
    by every teacher like any other response; the target mask covers the generated tokens.
    """

    teacher: Optional[str] = None  # teacher name; default: the sample's routed teacher (see generating_teacher)
    max_new_tokens: int = 256  # a response stops at EOS or after this many tokens (or at data.max_length)
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only: keep the smallest set of tokens with this much probability
    seed: int = 0  # sampling only: each row draws from its own generator seeded by (seed, source, row)


@dataclass
class SourceConfig:
    path: str  # local json/jsonl/parquet/csv file, or a Hub dataset id
    split: str = "train"
    name: Optional[str] = None  # Hub dataset config name
    format: Literal["prompt_response", "chat", "text"] = "prompt_response"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    chat_template: bool = False  # render prompt/response through the tokenizer's chat template
    domain: Optional[str] = None  # routing tag for every sample of this source
    domain_field: Optional[str] = None  # or: read the tag from this field
    num_samples: Optional[int] = None  # take the first N rows (after shuffling when `shuffle`)
    shuffle: bool = False
    generate: Optional[GenerateConfig] = None  # prompt-only source: a teacher writes the responses


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    max_length: int = 512  # tokens; longer samples are truncated (and counted)
    mask: Literal["response", "all"] = "response"  # which tokens are distillation targets
    seed: int = 0


@dataclass
class CacheConfig:
    dir: str = "{run_dir}/cache"
    # Most teacher tokens kept per position; null = the codec's own (default: 48, hifi: 128). The
    # default codec fills a fixed 64 B/token record with as many top tokens as fit, up to top_k.
    top_k: Optional[int] = None
    codec: str = "default"  # see distill/cache/codec.py
    shard_tokens: int = 1 << 20  # target tokens per shard
    batch_size: int = 8  # samples per teacher forward pass
    rebuild: bool = False  # discard a cache made from another recipe instead of refusing
    # vk codecs: code ids as ranks in the first teacher's own order (ids by how often they are in its
    # top-128 on a calibration subset), ~12% more entries per record at the same bytes; saved as
    # <cache>/id_order.npy. teacher | none; null = teacher for vk codecs, none for ef/fp16 (which refuse one).
    id_order: Optional[Literal["teacher", "none"]] = None
    # Calibration samples for the order (all their target rows), evenly strided: a one-time pass of the
    # first teacher; the bench reached its figures from ~1,500 rows, 256 samples hold far more.
    id_order_rows: int = 256
    # What `distill train` checks of the cache before it loads a model: full = every file's sha256, by
    # the main process (a flipped byte anywhere is named before training; files unchanged since the last
    # full check, by size, mtime and inode in <cache>/.verified.json, are not read again), sizes = sizes,
    # .npy headers and offsets only. `distill cache verify` hashes every file, whatever the stamp says.
    verify: Literal["full", "sizes"] = "full"


@dataclass
class LossConfig:
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # generalized JSD mixing weight, in (0, 1)
    skew_alpha: float = 0.1  # skew KL mixing weight, in (0, 1)
    ce_weight: float = 0.0  # mix in plain cross-entropy on the data tokens, in [0, 1)
    weighting: Weighting = "fixed"  # fixed | route (domain tags) | min_ce_sequence | min_ce_token | soft_ce
    weighting_temperature: float = 1.0  # for soft_ce
    chunk_size: int = 1024  # tokens per LM-head chunk


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # Wall clock for training + eval_reserve_minutes, counted from the start of the train stage: from
    # launch for `distill train`, from the end of the cache stage under `distill run` (the cache is not
    # charged). Training stops early enough for the final checkpoint and student save to fit too.
    budget_minutes: Optional[float] = None
    eval_reserve_minutes: float = 0.0
    save_every_steps: Optional[int] = None
    keep_last: int = 2
    log_every_steps: int = 10
    # Autocast compute dtype (accelerate's mixed precision); auto: bf16 on a CUDA GPU that supports
    # it, else no. The weights being trained stay fp32 (see student.dtype).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Train the student's weights in bf16 directly: no fp32 master copy, optimizer state in bf16
    # (8 instead of 16 bytes per trainable parameter). RISK: an AdamW update below half a bf16 ulp
    # rounds away, so at fine-tuning learning rates most weights never change (20 steps at lr 2e-5:
    # 88% of weights of std 0.05 unchanged). Warns at start; not for DeepSpeed, whose bf16 mode always keeps fp32 masters.
    pure_bf16: bool = False
    # Loader processes reading and collating the cache per rank; null = auto (2 with CUDA, 0 on CPU,
    # where workers would take cores from the model). Pinned memory is used with CUDA.
    num_workers: Optional[int] = None
    # Batch samples of similar length (less padding); order stays a pure function of (seed, epoch).
    # Off by default: when skills differ in length it makes single-skill batches, and the
    # synthetic experiment's student then fell from 99.5%/100% to 61%/76% retention.
    group_by_length: bool = False
    group_batches: int = 50  # length grouping sorts windows of this many global batches
    # Run every teacher online (sets teachers.N.online for all teachers when the recipe loads).
    online_teachers: bool = False


@dataclass(kw_only=True)
class EvalModelConfig(MergeConfig):
    """A model to score: `model` (path or Hub id, optional adapter / gguf_file), or a merge baseline
    (`merge` and the MergeConfig keys), written to <run_dir>/baselines/<name>/."""

    name: str
    model: Optional[str] = None  # path or Hub id
    adapter: Optional[str] = None
    gguf_file: Optional[str] = None


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # task names (eval/tasks/*.yaml) or spec paths
    limit: Optional[int] = None  # evaluate a fixed subset of N examples per task
    batch_size: int = 16
    protocol: Literal["competition", "standard"] = "competition"
    student: bool = True
    teachers: bool = True  # also evaluate each teacher
    models: list[EvalModelConfig] = field(default_factory=list)  # extra models / merge baselines
    skills: dict[str, str] = field(default_factory=dict)  # teacher name -> task of its own skill (retention)
    cache: bool = True  # reuse results of unchanged (model, task, settings); --no-eval-cache turns it off
    cache_dir: Optional[str] = None  # default: $DISTILL_EVAL_CACHE, $DISTILL_HOME/eval-cache, ~/.cache/distill/eval-cache


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "distill"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    mode: Literal["online", "offline"] = "offline"


@dataclass
class PublishConfig:
    """`distill publish` (distill/publish.py): the model folder <run>/publish/ and where it is pushed."""

    repo_id: Optional[str] = None  # Hub model repo, `owner/name` (or `name`: under the token's own user)
    private: bool = True  # a repo created by the push is private; an existing repo keeps its visibility
    push: bool = False  # publish only when asked: `distill run` pushes only with push: true
    revision: Optional[str] = None  # branch to push to, created from main if missing; null: main
    commit_message: Optional[str] = None  # null: "distill: <recipe name>"
    # merged: a full model folder (a LoRA student merged into its base, as `distill train` saves it);
    # adapter: a LoRA student's adapter alone, for peft over student.model (named as the card's base_model)
    format: Literal["merged", "adapter"] = "merged"
    # A Hub licence id (apache-2.0, mit, llama3.1, other, ...) for the card; null: derived from the
    # student's base and the teachers (see distill/model_card.py, `licence`)
    license: Optional[str] = None


@dataclass
class Recipe:
    name: str
    teachers: list[TeacherConfig]
    student: StudentConfig
    data: DataConfig = field(default_factory=DataConfig)
    run_dir: str = "runs/{name}"
    seed: int = 0
    trust_remote_code: bool = False
    # Read pickle weights (pytorch_model.bin, adapter_model.bin) where a model or adapter has no
    # safetensors. Off: such a model is refused by name, since unpickling runs code.
    allow_pickle: bool = False
    tokenizer: Optional[str] = None  # default: the student's tokenizer
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "override must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(key, "override key has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        dotted = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(dotted, f"index out of range (list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(dotted, "cannot set a sub-key of a scalar value")


# ---------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(str(path), "recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start}; a binary file?)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a recipe must be a YAML mapping")
    return data


def _substitute(obj: Any, values: dict[str, str]) -> Any:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _substitute(getattr(obj, f.name), values))
        return obj
    if isinstance(obj, list):
        return [_substitute(v, values) for v in obj]
    if isinstance(obj, str):
        for k, v in values.items():
            obj = obj.replace("{" + k + "}", v)
        return obj
    return obj


def _mentions(obj: Any, text: str) -> bool:
    if dataclasses.is_dataclass(obj):
        return any(_mentions(getattr(obj, f.name), text) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return any(_mentions(v, text) for v in obj)
    if isinstance(obj, dict):
        return any(_mentions(v, text) for v in obj.values())
    return isinstance(obj, str) and text in obj


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check, substitute and validate a recipe."""
    path = Path(path)
    try:
        return _load(path, overrides)
    except ConfigError as exc:  # the key's file first: a user may hold several recipes
        if exc.source is not None or exc.key == str(path):
            raise
        raise ConfigError(exc.key, exc.message, source=str(path)) from None


def _load(path: Path, overrides) -> Recipe:
    data = _read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    recipe = build(Recipe, data)
    run_dir = recipe.run_dir.replace("{name}", recipe.name)
    recipe.run_dir = run_dir
    values = {"run_dir": run_dir, "recipe_dir": str(path.resolve().parent)}
    if _mentions(recipe, "{smollm2}"):
        from distill.smollm import smollm2_path

        values["smollm2"] = str(smollm2_path())  # converted once, then reused
    _substitute(recipe, values)
    validate(recipe)
    check_paths(recipe)
    return recipe


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def plain_name(name: str) -> bool:
    """A name that becomes one path component under the run directory: no separator, no '..'."""
    return bool(re.fullmatch(r"[\w][\w.-]*", name or ""))


def validate(r: Recipe) -> None:
    """Cross-field and range checks, section by section. Raises ConfigError naming the key.

    Some values are resolved here (cache.top_k, cache.id_order, train.online_teachers, merge
    defaults), so that the saved recipe shows what was used."""
    _require(bool(r.name.strip()), "name", "must not be empty")
    # the default run_dir is runs/{name}: a name never picks another directory
    _require("/" not in r.name and "\\" not in r.name and not r.name.startswith("."), "name",
             f"must not hold '/' or '\\' or start with '.', got {r.name!r}")
    names = _validate_teachers(r)
    _validate_student(r)
    _validate_data(r, names)
    _validate_cache(r.cache)
    _validate_loss(r)
    _validate_train(r)
    _validate_eval(r, names)
    _validate_publish(r)


def _validate_teachers(r: Recipe) -> set[str]:
    """teachers: names, models, weights; returns the set of teacher names."""
    _require(len(r.teachers) > 0, "teachers", "at least one teacher is required")
    names: set[str] = set()
    for i, t in enumerate(r.teachers):
        key = f"teachers[{i}]"
        _require(bool(t.name) and t.name.replace("_", "").replace("-", "").isalnum(),
                 f"{key}.name", f"must be letters, digits, '-' or '_', got {t.name!r}")
        _require(t.name not in names, f"{key}.name", f"duplicate teacher name {t.name!r}")
        names.add(t.name)
        _require(bool(t.model.strip()), f"{key}.model", "must not be empty")
        _require(t.weight >= 0, f"{key}.weight", f"must be >= 0, got {t.weight}")
        _require(t.quantization == "none" or not t.gguf_file, f"{key}.quantization",
                 f"{t.quantization} cannot be combined with gguf_file (transformers refuses to quantize a GGUF "
                 "model with bitsandbytes); use quantization: none or a safetensors model")
    _require(sum(t.weight for t in r.teachers) > 0, "teachers", "teacher weights sum to zero")
    if r.train.online_teachers:  # resolved here, so the saved recipe shows which teachers run online
        for t in r.teachers:
            t.online = True
    return names


def _validate_student(r: Recipe) -> None:
    _require(bool(r.student.model.strip()), "student.model", "must not be empty")
    _require(r.student.max_params > 0, "student.max_params", "must be > 0")
    if r.student.lora is not None:
        _require(r.student.lora.r > 0, "student.lora.r", f"must be > 0, got {r.student.lora.r}")
        _require(r.student.lora.alpha > 0, "student.lora.alpha", "must be > 0")
        _require(0 <= r.student.lora.dropout < 1, "student.lora.dropout", "must be in [0, 1)")
        _require(bool(r.student.lora.target_modules), "student.lora.target_modules", "must not be empty")
    if r.student.init is not None:
        _require(bool(r.student.init.merge), "student.init.merge", "must name at least one teacher")
        _validate_merge(r, r.student.init, "student.init")
        if r.student.lora is not None:  # the student's adapter starts as the merged adapter
            for j, tname in enumerate(r.student.init.merge):
                t = next((t for t in r.teachers if t.name == tname), None)
                _require(t is not None and bool(t.adapter) and t.model == r.student.model, f"student.init.merge[{j}]",
                         f"a LoRA student starts from merged adapters: {tname!r} must be a LoRA adapter over "
                         f"student.model ({r.student.model})")
            _require(r.student.init.base == r.student.model, "student.init.base",
                     "a LoRA student's merge is over its own base, student.model")


def _validate_data(r: Recipe, names: set[str]) -> None:
    d = r.data
    _require(len(d.sources) > 0, "data.sources", "at least one data source is required")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _require(bool(s.path.strip()), f"{key}.path", "must not be empty")
        _require(s.num_samples is None or s.num_samples > 0, f"{key}.num_samples",
                 f"must be > 0, got {s.num_samples}")
        _require(not (s.domain and s.domain_field), f"{key}.domain",
                 "set either domain or domain_field, not both")
        if s.generate is not None:
            _validate_generate(r, s, key, names)
    _require(d.max_length >= 2, "data.max_length", f"must be >= 2, got {d.max_length}")


def _validate_cache(c: CacheConfig) -> None:
    from distill.cache.codec import CODECS, DEFAULT_TOP_K, VarKCodec  # local import: codec imports torch

    _require(c.codec in CODECS, "cache.codec", f"unknown codec {c.codec!r} (known: {', '.join(sorted(CODECS))})")
    if c.top_k is None:  # resolved here, so the saved recipe shows the value used
        _require(c.codec in DEFAULT_TOP_K, "cache.top_k", f"required with codec {c.codec!r}")
        c.top_k = DEFAULT_TOP_K[c.codec]
    _require(c.top_k > 0, "cache.top_k", f"must be > 0, got {c.top_k}")
    is_vk = isinstance(CODECS[c.codec](1, 1 << 16), VarKCodec)
    if c.id_order is None:  # resolved here, like top_k
        c.id_order = "teacher" if is_vk else "none"
    _require(c.id_order in ("teacher", "none"), "cache.id_order", f"must be teacher or none, got {c.id_order!r}")
    _require(c.id_order == "none" or is_vk, "cache.id_order",
             f"an id order is for vk codecs only; codec {c.codec!r} needs id_order: none")
    _require(c.id_order_rows > 0, "cache.id_order_rows", f"must be > 0, got {c.id_order_rows}")
    _require(c.shard_tokens > 0, "cache.shard_tokens", f"must be > 0, got {c.shard_tokens}")
    _require(c.batch_size > 0, "cache.batch_size", f"must be > 0, got {c.batch_size}")


def _validate_loss(r: Recipe) -> None:
    d = r.data
    lo = r.loss
    _require(lo.temperature > 0, "loss.temperature", f"must be > 0, got {lo.temperature}")
    _require(0 < lo.beta < 1, "loss.beta", f"must be in (0, 1), got {lo.beta}")
    _require(0 < lo.skew_alpha < 1, "loss.skew_alpha", f"must be in (0, 1), got {lo.skew_alpha}")
    _require(0 <= lo.ce_weight < 1, "loss.ce_weight", f"must be in [0, 1), got {lo.ce_weight}")
    _require(lo.weighting_temperature > 0, "loss.weighting_temperature", "must be > 0")
    _require(lo.chunk_size > 0, "loss.chunk_size", f"must be > 0, got {lo.chunk_size}")
    _require(lo.weighting != "min_ce", "loss.weighting",
             "'min_ce' is now two weightings: min_ce_sequence (FuseLLM's MinCE: per sample, the teacher with the "
             "lowest cross-entropy over the sequence) or min_ce_token (per gold token); pick one")
    if lo.weighting == "route":
        # A teacher with no domains serves every domain; a sample with no tag is served by all.
        served = {dom for t in r.teachers for dom in t.domains}
        generalist = any(not t.domains for t in r.teachers)
        for i, s in enumerate(d.sources):
            if s.domain is not None and not generalist and s.domain not in served:
                raise ConfigError(f"data.sources[{i}].domain",
                                  f"no teacher serves domain {s.domain!r} (served: {', '.join(sorted(served))})")


def _validate_train(r: Recipe) -> None:
    t = r.train
    _require(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    _require(t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    _require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _require(t.grad_accum > 0, "train.grad_accum", f"must be > 0, got {t.grad_accum}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _require(t.budget_minutes is None or t.budget_minutes > 0, "train.budget_minutes",
             f"must be > 0, got {t.budget_minutes}")
    _require(t.eval_reserve_minutes >= 0, "train.eval_reserve_minutes", "must be >= 0")
    if t.budget_minutes is not None:
        _require(t.eval_reserve_minutes < t.budget_minutes, "train.eval_reserve_minutes",
                 "must be smaller than train.budget_minutes")
    _require(t.save_every_steps is None or t.save_every_steps > 0, "train.save_every_steps", "must be > 0")
    _require(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    _require(t.num_workers is None or t.num_workers >= 0, "train.num_workers", f"must be >= 0, got {t.num_workers}")
    _require(t.group_batches >= 1, "train.group_batches", f"must be >= 1, got {t.group_batches}")
    _require(not t.pure_bf16 or r.student.dtype in ("auto", "bfloat16"), "train.pure_bf16",
             f"trains bf16 weights; student.dtype must be auto or bfloat16, got {r.student.dtype!r}")


def _validate_eval(r: Recipe, names: set[str]) -> None:
    e = r.eval
    _require(e.limit is None or e.limit > 0, "eval.limit", f"must be > 0, got {e.limit}")
    _require(e.batch_size > 0, "eval.batch_size", f"must be > 0, got {e.batch_size}")
    eval_names = {"student", *names}
    for i, m in enumerate(e.models):
        key = f"eval.models[{i}]"
        _require(plain_name(m.name), f"{key}.name", f"must be letters, digits, '.', '-' or '_' (a folder name "
                 f"under the run directory), got {m.name!r}")
        _require(m.name not in eval_names, f"{key}.name", f"duplicate model name {m.name!r}")
        eval_names.add(m.name)
        _require((m.model is None) != (not m.merge), f"{key}",
                 "set exactly one of model (a path or Hub id) or merge (a list of teacher names)")
        if m.merge:
            _validate_merge(r, m, key)
    for tname, task in e.skills.items():
        _require(tname in names, f"eval.skills.{tname}", "not a teacher name")
        _require(task in {Path(x).stem for x in e.tasks} | set(e.tasks), f"eval.skills.{tname}",
                 f"task {task!r} is not in eval.tasks")


_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_LICENCE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def _validate_publish(r: Recipe) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # offline: a pattern check

    p = r.publish
    _require(not p.push or bool(p.repo_id), "publish.repo_id", "required when publish.push is true")
    if p.repo_id is not None:
        try:
            validate_repo_id(p.repo_id)
        except HFValidationError:
            raise ConfigError("publish.repo_id", f"{p.repo_id!r} is not a Hub repo id (owner/name: letters, digits, "
                              "'-', '_', '.'; no '--' or '..'; at most 96 characters each)") from None
    if p.revision is not None:
        # git's ref rules, narrowed: a branch to create or push to (refs/pr/N and tags are not pushed to)
        _require(bool(_BRANCH.fullmatch(p.revision)) and ".." not in p.revision
                 and not p.revision.endswith(("/", ".lock")) and not p.revision.startswith("refs/"), "publish.revision",
                 f"{p.revision!r} is not a branch name (letters, digits, '.', '_', '-', '/')")
    _require(p.commit_message is None or bool(p.commit_message.strip()), "publish.commit_message", "must not be empty")
    _require(p.format != "adapter" or r.student.lora is not None, "publish.format",
             "adapter needs a LoRA student (student.lora); a full student is published merged")
    _require(p.license is None or bool(_LICENCE.fullmatch(p.license)), "publish.license",
             f"{p.license!r} is not a Hub licence id (lowercase, e.g. apache-2.0, mit, other)")


def _validate_merge(r: Recipe, m: MergeConfig, key: str) -> None:
    """Check a merge and resolve its defaults (weights, majority_sign_method), so the saved recipe shows them."""
    teachers = {t.name: t for t in r.teachers}
    for j, tname in enumerate(m.merge):
        _require(tname in teachers, f"{key}.merge[{j}]", f"unknown teacher {tname!r}")
        _require(tname not in m.merge[:j], f"{key}.merge[{j}]", f"teacher {tname!r} is listed twice")
    n, sparse, signed = len(m.merge), m.method != "linear", m.method in ("ties", "dare_ties")
    if m.weights is None:
        m.weights = [1.0] * n if signed else [1.0 / n] * n
    _require(len(m.weights) == n, f"{key}.weights", f"needs one weight per merged teacher ({n}), got {len(m.weights)}")
    _require(all(math.isfinite(w) for w in m.weights), f"{key}.weights", f"must be finite, got {m.weights}")
    if sparse:
        _require(m.density is not None, f"{key}.density", f"required with method {m.method} (in (0, 1])")
        _require(0 < m.density <= 1, f"{key}.density", f"must be in (0, 1], got {m.density}")
    else:
        _require(m.density is None, f"{key}.density", "only applies to methods ties, dare_linear, dare_ties")
    if signed:
        m.majority_sign_method = m.majority_sign_method or "total"
    else:
        _require(m.majority_sign_method is None, f"{key}.majority_sign_method", "only applies to ties and dare_ties")
    experts = [teachers[x] for x in m.merge]
    if m.base is None:
        lora_bases = {(t.model, t.revision, t.gguf_file) for t in experts if t.adapter}
        full = [t.name for t in experts if not t.adapter]
        base_free = m.method == "linear" and abs(sum(m.weights) - 1) < 1e-6
        _require(len(lora_bases) <= 1 or base_free, f"{key}.base",
                 "the LoRA experts have different bases; name the base their task vectors are taken from")
        _require(not full or base_free, f"{key}.base",
                 f"required: {', '.join(full)} {'is a full fine-tune' if len(full) == 1 else 'are full fine-tunes'}, "
                 f"and a {m.method} merge takes task vectors (expert - base)")
        if len(lora_bases) == 1:  # the deltas' own base: then non-adapted weights stay exactly the base's
            m.base = next(iter(lora_bases))[0]
    _require(m.base is None or bool(m.base.strip()), f"{key}.base", "must not be empty")


def generating_teacher(gen: GenerateConfig, domain: Optional[str], teachers: list[TeacherConfig]) -> Optional[str]:
    """Who writes a prompt-only sample's response: `generate.teacher` when set, else the first
    teacher (recipe order) whose `domains` include the sample's tag, else the first teacher with
    no `domains` (it serves every domain). None when no teacher qualifies."""
    if gen.teacher is not None:
        return gen.teacher
    if domain is not None:
        for t in teachers:
            if domain in t.domains:
                return t.name
    return next((t.name for t in teachers if not t.domains), None)


def _validate_generate(r: Recipe, s: SourceConfig, key: str, names: set[str]) -> None:
    g, gkey = s.generate, f"{key}.generate"
    _require(s.format in ("prompt_response", "chat"), gkey,
             f"needs format prompt_response or chat (a prompt to continue), got format {s.format!r}")
    _require(g.teacher is None or g.teacher in names, f"{gkey}.teacher",
             f"unknown teacher {g.teacher!r} (teachers: {', '.join(sorted(names))})")
    _require(g.max_new_tokens > 0, f"{gkey}.max_new_tokens", f"must be > 0, got {g.max_new_tokens}")
    _require(g.temperature > 0, f"{gkey}.temperature", f"must be > 0, got {g.temperature}")
    _require(0 < g.top_p <= 1, f"{gkey}.top_p", f"must be in (0, 1], got {g.top_p}")
    if not g.do_sample:
        for k in ("temperature", "top_p"):
            _require(getattr(g, k) == 1.0, f"{gkey}.{k}", "only applies when generate.do_sample is true")
    if g.teacher is None and s.domain_field is None:  # a per-row tag is checked when the data is read
        tag = f"domain {s.domain!r}" if s.domain is not None else "untagged samples"
        _require(generating_teacher(g, s.domain, r.teachers) is not None, f"{gkey}.teacher",
                 f"no teacher is routed for {tag} (no teacher lists it in domains, and none has empty "
                 "domains); name one here")


def looks_local(ref: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") >= 2 or os.path.exists(os.path.expanduser(ref))


def check_paths(r: Recipe) -> None:
    """Local inputs must exist, except those under the run directory (made by earlier stages)."""
    run = os.path.normpath(r.run_dir)

    def check(ref: str | None, key: str) -> None:
        if not ref or not looks_local(ref):
            return
        norm = os.path.normpath(os.path.expanduser(ref))
        if norm == run or norm.startswith(run + os.sep):
            return
        if not os.path.exists(norm):
            raise ConfigError(key, f"path {ref!r} does not exist")

    for i, t in enumerate(r.teachers):
        check(t.model, f"teachers[{i}].model")
        check(t.adapter, f"teachers[{i}].adapter")
    check(r.student.model, "student.model")
    check(r.tokenizer, "tokenizer")
    for i, s in enumerate(r.data.sources):
        check(s.path, f"data.sources[{i}].path")
    for i, m in enumerate(r.eval.models):
        check(m.model, f"eval.models[{i}].model")
        check(m.adapter, f"eval.models[{i}].adapter")
        check(m.base, f"eval.models[{i}].base")
    if r.student.init is not None:
        check(r.student.init.base, "student.init.base")


def recipe_dict(recipe: Recipe) -> dict:
    return to_dict(recipe)
