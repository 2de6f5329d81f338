"""Hardware figures the planner assumes: peak dense bf16 tensor TFLOPS, memory bandwidth, memory.

Peaks are the vendors' dense figures (no 2:4 sparsity) for bf16 with fp32 accumulation, from
their datasheets and architecture whitepapers; memory is what `nvidia-smi` reports, in GiB.
A run reaches only a fraction of the peak (the MFU, model FLOPs utilisation): the planner
assumes MFU_FORWARD for teacher forwards (long prefill batches) and MFU_TRAIN for training
steps, prints both, and `distill plan --measure` replaces the rates by measured ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distill.errors import DistillError


@dataclass(frozen=True)
class Hardware:
    name: str
    tflops: float  # dense bf16 peak (fp32 for `cpu`), per device
    bandwidth_gbs: float  # memory bandwidth, GB/s
    memory_gib: float  # device memory per device
    dtype: str  # what `dtype: auto` resolves to on it (distill.models.resolve_dtype)
    note: str = ""

    def describe(self) -> dict:
        return asdict(self)


# Utilisation assumed before measuring: typical of HF transformers models in bf16 without fused
# kernels (prefill-heavy inference ~40%, training with autocast and AdamW ~35%).
MFU_FORWARD = 0.40
MFU_TRAIN = 0.35
DISK_GBS = 1.0  # reading weights from local disk (already downloaded; Hub downloads are not counted)
SAVE_GBS = 0.2  # writing checkpoints: the trainer's own save guess (distill.train.save_guess_s)

GPUS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a6000", 154.8, 768, 48.0, "bfloat16", "RTX A6000 (Ampere, 48 GB GDDR6)"),
    Hardware("a100-40", 312.0, 1555, 40.0, "bfloat16", "A100 40 GB SXM"),
    Hardware("a100-80", 312.0, 2039, 80.0, "bfloat16", "A100 80 GB SXM"),
    Hardware("h100", 989.4, 3350, 79.6, "bfloat16", "H100 SXM 80 GB"),
    Hardware("h200", 989.4, 4800, 140.4, "bfloat16", "H200 SXM 141 GB"),
    Hardware("l4", 121.0, 300, 22.5, "bfloat16", "L4 24 GB"),
    Hardware("l40s", 362.1, 864, 45.0, "bfloat16", "L40S 48 GB"),
    Hardware("rtx4090", 165.2, 1008, 24.0, "bfloat16", "GeForce RTX 4090 24 GB (fp32-accumulate rate)"),
    Hardware("rtx3090", 71.0, 936, 24.0, "bfloat16", "GeForce RTX 3090 24 GB (fp32-accumulate rate)"),
    # A CPU has no tensor peak to quote: 0.15 TFLOPS is 2 AVX-512 cores at ~2.3 GHz x 32 fp32
    # FLOP/cycle; memory is the host's RAM (the planner's limit for "device" memory on CPU).
    Hardware("cpu", 0.15, 10, 128.0, "float32",
             "2 x86 cores with AVX-512, fp32 (ASSUMED: 0.15 TFLOPS peak, 10 GB/s, 128 GiB RAM; "
             "use --measure for this machine's rates)"),
)}
ALIASES = {"a100": "a100-80", "h100-80": "h100", "4090": "rtx4090", "3090": "rtx3090", "rtx-a6000": "a6000",
           "a6000-48": "a6000"}

# On a CPU the rates are fp32 vector rates, not tensor-core ones; utilisation of that peak is higher.
MFU_CPU = 0.6


def get_hardware(name: str) -> Hardware:
    """The table's entry for `name` (case-insensitive, a few aliases); one-line error otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise DistillError(f"--gpu {name!r}: unknown (known: {', '.join(GPUS)})")
    return GPUS[key]


def mfu(hw: Hardware, stage: str) -> float:
    """The utilisation assumed for `stage` ("forward" or "train") on `hw`."""
    if hw.name == "cpu":
        return MFU_CPU
    return MFU_FORWARD if stage == "forward" else MFU_TRAIN
