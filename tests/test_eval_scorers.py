"""The scoring rules: the starter kit's MAWPS number rule, and exact match."""

import pytest

from distill.evaluation.scorers import exact_match, extract_number, number_match, parse_gold_number

# (generated text, the number the starter kit's rule extracts). Quirks of the rule are
# kept on purpose: the competition was scored with it.
EXTRACT_CASES = [
    # plain text: the last number
    ("The answer is 42", "42"),
    ("10 apples and 20 pears", "20"),
    ("answer: 12.0", "12.0"),
    ("007", "007"),
    # equations: the first number after the last "="
    ("x = 5", "5"),
    ("3 + 4 = 7", "7"),
    ("= 8", "8"),
    ("so x = 12, then 13", "12"),
    ("2 + 2 = 4\n\nQuestion: 5 + 5", "4"),
    # several "="
    ("3 + 4 = 7 and 7 * 2 = 14", "14"),
    ("a = 2 = 3 = 4", "4"),
    ("x == 10", "10"),
    # "=" with no number after the last one: fall back to the last number anywhere
    ("5 apples, x = ?", "5"),
    ("x=5=", "5"),
    # commas are removed; a [,.] group is taken once only
    ("total = 1,234 apples", "1234"),
    ("He has 1,000 dollars", "1000"),
    ("He has 1,000,000 dollars", "000"),  # "1,000" then "000": the rule reads the last
    ("3,5", "35"),  # a decimal comma reads as a thousands separator
    # decimals
    ("3.75", "3.75"),
    ("x = 0.5", "0.5"),
    ("It costs $12.50.", "12.50"),
    ("1,234.5", "5"),  # "1,234" and "5"
    ("3. 4", "4"),
    ("1e5", "5"),
    # negatives: the pattern has no sign
    ("The temperature is -7 degrees", "7"),
    ("x = -3", "3"),
    # fractions: read as two numbers
    ("1/2 of the pie", "2"),
    ("x = 3/4", "3"),
    # no number at all
    ("no number here", None),
    ("", None),
    ("x =", None),
]


def test_extract_table_is_big_enough():
    assert len(EXTRACT_CASES) >= 25


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("generated,gold,correct", [
    ("x = 12", "12.0", True),
    ("12.00", "12", True),
    ("1,000", "1000", True),
    ("0.5", "1/2", True),  # Calc-mawps golds can be fractions
    ("3", "3/4", False),
    ("7", "-7.0", False),  # a negative gold can never be matched
    ("-7", "-7.0", False),
    ("0.67", "0.6666666666666666", False),  # exact float equality, no tolerance
    ("no idea", "3", False),
    ("21.3333", "21.3333", True),
])
def test_number_match(generated, gold, correct):
    assert number_match(generated, gold)[1] is correct


def test_parse_gold_number():
    assert parse_gold_number("3/4") == 0.75
    assert parse_gold_number("12.0") == 12.0
    assert parse_gold_number("abc") is None
    assert parse_gold_number("1/0") is None


@pytest.mark.parametrize("generated,target,correct", [
    (" 42 \n", "42", True),
    ("42", " 42", True),
    ("4 2", "42", False),
    ("421", "42", False),
    ("olleh", "olleh", True),
    ("", "x", False),
])
def test_exact_match(generated, target, correct):
    prediction, ok = exact_match(generated, target)
    assert ok is correct
    assert prediction == generated.strip()
