"""Multi-teacher distillation loss: sparse teachers, chunked LM head, per-token teacher weighting.

Public API (see docs/loss.md for the maths):

    example_weights(teacher_weights, teacher_domains, sample_domains, weighting) -> [N, B]
    distill_loss(hidden, head_weight, head_bias, signal, targets, token_weights, cfg,
                 *, logit_transform=None, sequence_index=None) -> LossOutput

Modules: divergences (the k + 1 bin divergences and temperature), weighting
(teacher weights and per-token shares), chunked (the fused LM head + loss and
its closed-form gradient), multi_teacher (the entry point and its dataclasses).
"""

from distill.loss.divergences import DIVERGENCES, teacher_log_bins
from distill.loss.multi_teacher import IGNORE_INDEX, LossOutput, TeacherSignal, distill_loss
from distill.loss.weighting import (CE_WEIGHTINGS, WEIGHTINGS, example_weights, gold_cross_entropy,
                                    sequence_cross_entropy, token_shares)

__all__ = [
    "CE_WEIGHTINGS",
    "DIVERGENCES",
    "IGNORE_INDEX",
    "WEIGHTINGS",
    "LossOutput",
    "TeacherSignal",
    "distill_loss",
    "example_weights",
    "gold_cross_entropy",
    "sequence_cross_entropy",
    "teacher_log_bins",
    "token_shares",
]
