"""The recipe's models as the planner sees them: architecture, parameter counts, dtype, adapters.

Teachers are grouped exactly as capture groups them (`distill.cache.teachers.groups`): LoRA
experts over one base share one load of it, and each expert adds only its adapter's
parameters to a token's forward (peft runs the adapter unmerged: x A B beside x W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.config import Recipe
from distill.plan.gpus import Hardware
from distill.plan.memory import weight_bytes
from distill.plan.params import ParamCount, Shape, count_params, lora_params, lora_student_params, read_adapter, \
    read_shape


@dataclass
class TeacherSpec:
    name: str
    adapter_params: int  # 0 for a full model
    online: bool


@dataclass
class GroupSpec:
    """One base model and the teachers that run on it."""

    model: str
    shape: Shape
    params: ParamCount
    dtype: str  # bfloat16 / float32 ... as loaded
    quantization: str
    weight_bytes: float  # the base as loaded (adapters are small and counted in adapter_params)
    teachers: list[TeacherSpec] = field(default_factory=list)


@dataclass
class StudentSpec:
    model: str
    shape: Shape
    params: ParamCount
    trainable: int
    frozen: int
    lora: bool
    checkpointing: bool
    frozen_dtype: str
    act_bytes: int  # bytes per activation: 2 under bf16 autocast (train.mixed_precision auto on CUDA), else 4


def _dtype(name: str, hw: Hardware) -> str:
    return hw.dtype if name == "auto" else name


def teacher_groups(recipe: Recipe, hw: Hardware, config_dir: str | None) -> list[GroupSpec]:
    from distill.cache.teachers import groups

    out = []
    for group in groups(recipe.teachers):
        first = group[0]
        shape = read_shape(first.model, revision=first.revision, config_dir=config_dir,
                           trust_remote_code=recipe.trust_remote_code, what=f"teacher {first.name}")
        params = count_params(shape)
        dtype = _dtype(first.dtype, hw)
        g = GroupSpec(first.model, shape, params, dtype, first.quantization,
                      weight_bytes(params, dtype, first.quantization))
        for t in group:
            extra = 0
            if t.adapter:
                extra = lora_params(shape, read_adapter(t.adapter, config_dir=config_dir,
                                                        what=f"teacher {t.name} adapter"))
            g.teachers.append(TeacherSpec(t.name, extra, t.online))
        out.append(g)
    return out


def student_spec(recipe: Recipe, hw: Hardware, config_dir: str | None) -> StudentSpec:
    s = recipe.student
    shape = read_shape(s.model, revision=s.revision, config_dir=config_dir,
                       trust_remote_code=recipe.trust_remote_code, what="student.model")
    params = count_params(shape)
    if s.lora is not None:
        trainable = lora_student_params(shape, s.lora.r, s.lora.target_modules)
        frozen = params.total
        # A LoRA student's frozen base keeps student.dtype (auto: bf16 on CUDA, fp32 elsewhere).
        frozen_dtype = _dtype(s.dtype, hw)
    else:
        trainable, frozen, frozen_dtype = params.total, 0, "float32"
    mp = recipe.train.mixed_precision
    half = mp in ("bf16", "fp16") or (mp == "auto" and hw.dtype == "bfloat16")
    return StudentSpec(s.model, shape, params, trainable, frozen, s.lora is not None, s.gradient_checkpointing,
                       frozen_dtype, 2 if half else 4)
