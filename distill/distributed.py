"""How this process was launched: plain, `accelerate launch` DDP, or DeepSpeed; CPU or CUDA.

accelerate's `cpu=True` is what makes CPU ranks form a (gloo) process group for DDP, but
it also switches DeepSpeed off. So a DeepSpeed launch on a CPU machine keeps `cpu=False`
and passes the gloo backend explicitly; DeepSpeed then picks its CPU accelerator itself.
"""

from __future__ import annotations

import os

import torch


def launched() -> bool:
    """True under `accelerate launch` / torchrun (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def deepspeed_launch() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerate_cpu() -> bool:
    """The `cpu` flag to give accelerate: no CUDA, and not a DeepSpeed launch."""
    return not torch.cuda.is_available() and not deepspeed_launch()


def gloo_needed() -> bool:
    """Several CPU processes: they talk over gloo (DeepSpeed included)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def partial_state():
    """accelerate's PartialState when launched, else None."""
    if not launched():
        return None
    from accelerate import PartialState

    if torch.cuda.is_available():
        return PartialState()
    return PartialState(cpu=accelerate_cpu(), backend="gloo")
