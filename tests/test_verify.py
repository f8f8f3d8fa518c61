"""Outcome verification. Pure Python."""

import pytest

from cso_lib.verify import normalize, verify


@pytest.mark.parametrize(
    "answer, truth, ok",
    [
        ("Paris", "paris", True),
        ("The answer is: Paris.", "Paris", True),
        ("Lyon", "Paris", False),
        ("1,234", "1234", True),
        ("3.1416", "3.14159", True),
        ("3.2", "3.14159", False),
        ("$12", "12", True),
        ("a, b", '["b", "a"]', True),
        ("a and c", ["a", "b"], False),
        ("KSH", "ksh", True),
        ("", "x", False),
        (None, "x", False),
    ],
)
def test_verify(answer, truth, ok):
    assert verify(answer, truth)[0] is ok


def test_no_ground_truth_is_not_a_verdict():
    assert verify("x", None) == (None, "no ground truth")


def test_normalize_keeps_single_letter_answers():
    assert normalize("A") == "a" and normalize("the cat") == "cat"
