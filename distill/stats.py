"""Intervals for the report: one accuracy, and the paired difference of two models on the same examples.

    wilson(80, 100)                   -> (0.711, 0.867)   95% Wilson score interval of 80/100
    paired_difference([1, 0, 1], [0, 0, 1]) -> {"diff", "low", "high", "n"}
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/n.

    Wilson rather than the normal (Wald) interval: Wald collapses to [0, 0] at 0/n and to [1, 1] at
    n/n and undercovers near the ends, which is where small-model and expert accuracies sit (0.03, 0.99).
    """
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # It contains p in exact arithmetic; at 0/n and n/n rounding can put an end a hair past p
    # (0.0 against 1e-18), which a bar plot's whiskers refuse as a negative length.
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> dict:
    """Mean of a_i - b_i over the same examples, with a 95% normal interval on that mean.

    a, b: per-example scores (1 correct, 0 wrong) of two models on the same examples, in the same order.
    The normal interval on the mean of per-example differences (as in Miller 2024, "Adding error bars to
    evals", section 4) rather than a bootstrap: closed form and deterministic (no seed, identical on
    every rerun), and with the ~100s of examples per task used here the mean of bounded differences is
    close to normal. Pairing is what matters: var(a - b) = var(a) + var(b) - 2 cov(a, b), and two models
    of one family agree on most examples, so the interval is much tighter than two separate intervals.
    The sample variance uses n - 1; with n = 1, or when every difference is equal, the half-width is 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} scores; pairs need the same examples")
    n = len(a)
    if n == 0:
        raise ValueError("paired_difference: no examples")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    return {"diff": mean, "low": mean - z * se, "high": mean + z * se, "se": se, "n": n}


def mean_of_differences(parts: list[dict], z: float = Z95) -> dict:
    """The difference of mean accuracy over tasks, from each task's paired difference.

    Tasks have disjoint examples, so their estimates are independent: the mean's variance is
    sum(se_t^2) / T^2.
    """
    if not parts:
        raise ValueError("mean_of_differences: no tasks")
    t = len(parts)
    mean = sum(p["diff"] for p in parts) / t
    se = math.sqrt(sum(p["se"] ** 2 for p in parts)) / t
    return {"diff": mean, "low": mean - z * se, "high": mean + z * se, "se": se, "n": sum(p["n"] for p in parts)}


def gain_kept(student: float | None, expert: float | None, base: float | None) -> float | None:
    """(student - base) / (expert - base): the share of the expert's gain over the base that the student
    keeps. None when a score is missing or the expert does not beat the base (no gain to keep)."""
    if student is None or expert is None or base is None or expert <= base:
        return None
    return (student - base) / (expert - base)
