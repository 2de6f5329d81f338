"""Scoring functions: one per generative task kind, each `(generated_text, target) -> (prediction, correct)`.

A new generative kind is one function here plus its name in `SCORERS` (and in
`spec.Kind`). Multiple-choice tasks need no scorer: the prediction is the
choice with the highest log-likelihood (see loglik.py).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

# The starter kit's number pattern: digits, optionally one [,.] group. It has no
# sign, so "-7" reads as 7 and a negative gold answer can never be matched;
# "1,234.5" is read as two numbers, "1,234" and "5". Kept as is: the competition
# scored with it.
NUMBER = re.compile(r"\d+(?:[,.]\d+)?")


def extract_number(text: str) -> Optional[str]:
    """The LLM-Merging starter kit's answer rule for MAWPS.

    If the text has an "=" and a number follows the last one, the answer is the
    first number after the last "="; otherwise it is the last number anywhere in
    the text. Commas are removed ("1,000" -> "1000"). None when there is no number.
    """
    parts = text.split("=")
    after_last_equals = NUMBER.findall(parts[-1])
    if len(parts) > 1 and after_last_equals:
        found = after_last_equals[0]
    else:
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    return found.replace(",", "")


def parse_gold_number(target: str) -> Optional[float]:
    """A gold answer as a float; "a/b" fractions (Calc-mawps has them) are divided out."""
    try:
        if "/" in target:
            numerator, denominator = target.split("/")
            return float(numerator) / float(denominator)
        return float(target)
    except (ValueError, ZeroDivisionError):
        return None


def number_match(generated: str, target: str) -> tuple[Optional[str], bool]:
    """MAWPS: correct iff float(extracted) == float(gold), exactly (no tolerance)."""
    predicted = extract_number(generated)
    gold = parse_gold_number(target)
    return predicted, predicted is not None and gold is not None and float(predicted) == gold


def exact_match(generated: str, target: str) -> tuple[str, bool]:
    """Correct iff the stripped prediction equals the stripped target."""
    predicted = generated.strip()
    return predicted, predicted == target.strip()


SCORERS: dict[str, Callable[[str, str], tuple[Optional[str], bool]]] = {
    "generate_number": number_match,
    "generate_exact": exact_match,
}
