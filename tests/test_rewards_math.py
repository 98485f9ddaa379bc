"""Tests for MATH answer grading: extraction, normalization and equivalence."""

import pytest

from dqo_jax.rewards import grade, grade_batch
from dqo_jax.rewards.math_answer import extract_answer


def boxed(answer):
  return f"So the answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize(
    "response, expected",
    [
        ("\\boxed{5}", "5"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("\\fbox{7}", "7"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("$\\boxed 5$", "5"),
        ("\\boxed {5}", "5"),
        ("\\boxed{5", None),  # unbalanced
        ("\\boxed{}", None),
        ("the answer is 5", None),
    ],
)
def test_extraction(response, expected):
  assert extract_answer(response) == expected


# (gold, predicted, verdict). Fast-path and symbolic cases alike.
CASES = [
    # Numbers and formatting.
    ("5", "5", True),
    ("5", "5.0", True),
    ("5", "5.", True),
    ("5", "05", True),
    ("-5", "\u22125", True),  # unicode minus
    ("5", "-5", False),
    ("1000", "1,000", True),
    ("1000", "1{,}000", True),
    ("0.5", ".5", True),
    ("2.50", "2.5", True),
    ("3", "4", False),
    ("\\$5", "5", True),
    ("5", "\\$5", True),
    ("5", "5 \\text{ cm}", True),
    ("5\\text{ cm}^2", "5", True),
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("30", "30\u00b0", True),
    ("5\\%", "5", True),  # like PRM800K and Math-Verify: percent marks are dropped
    ("5", "5\\%", True),
    ("5", "\\text{5}", True),
    ("1.5\\times10^{3}", "1500", True),  # scientific notation
    ("1500", "1.5 \\times 10^3", True),
    ("1500", "1.5e3", True),
    ("0.001", "1\\times10^{-3}", True),
    ("1500", "1.5\\times10^{4}", False),
    # Fractions.
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{1}{2}", "1/2", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("-\\frac{1}{2}", "\\frac{1}{2}", False),
    ("\\frac{1}{3}", "0.33", False),  # exact, as PRM800K; Qwen's math_equal accepts within 1e-4
    ("\\frac{1}{3}", "0.3333333", False),
    ("\\frac{7}{2}", "3\\frac{1}{2}", True),  # Math-Verify reads mixed numbers
    ("\\frac{1}{0}", "1", False),
    ("\\frac{3}{4}", "\\left(\\frac{3}{4}\\right)", True),
    # Radicals and pi.
    ("\\sqrt{2}", "\\sqrt2", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\pi", "2 \\pi", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("2\\pi", "6.28", False),  # no rounding against pi
    ("\\pi", "3", False),
    ("3+2\\sqrt{2}", "2\\sqrt{2}+3", True),
    ("\\sqrt[3]{2}", "2^{1/3}", True),
    # Intervals: brackets matter.
    ("[1,2)", "[1,2)", True),
    ("[1,2)", "[1, 2)", True),
    ("(1,2)", "[1,2)", False),
    ("(-\\infty,3]", "(-\\infty, 3]", True),
    ("(-\\infty,3]", "(-\\infty,3)", False),
    ("(0,1)\\cup(2,3)", "(0,1) \\cup (2,3)", True),
    # Tuples: order matters; sets: it does not.
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("(3,-4)", "\\left(3, -4\\right)", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("1,2,3", "1, 2, 3", True),
    # Matrices and vectors.
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
    ("\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", True),
    (
        "\\begin{pmatrix}1/2\\\\1\\end{pmatrix}",
        "\\begin{pmatrix}\\frac{1}{2}\\\\1\\end{pmatrix}",
        True,
    ),
    # Equations against values (like Math-Verify and Qwen's math_equal; PRM800K does not).
    ("3", "x=3", True),
    ("x=3", "3", True),
    ("3", "x = 3", True),
    ("3", "y=4", False),
    ("y=2x+3", "y=2x+3", True),
    ("y=2x+3", "y = 3 + 2x", True),
    ("2", "k_1=2", True),
    ("5", "\\theta=5", True),
    # Expressions.
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "x^2+1", False),
    ("2x", "x+x", True),
    ("\\frac{x}{2}", "0.5x", True),
    ("xy", "yx", True),  # a product, not a word
    ("a+b", "b+a", True),
    ("-1", "-1", True),
    ("2^{10}", "1024", True),
    ("\\log_2 8", "3", True),
    ("i", "\\sqrt{-1}", False),  # as Math-Verify: no complex roots
    ("1+i", "i+1", True),
    ("1+i", "1-i", False),
    # Text answers.
    ("\\text{Monday}", "Monday", True),
    ("\\text{Monday}", "monday", True),
    ("\\text{Monday}", "\\text{Tuesday}", False),
    ("\\text{(C)}", "(C)", True),
    ("\\text{(C)}", "(D)", False),
    ("\\text{even}", "\\textbf{even}", True),
    ("\\text{odd}", "\\text{even}", False),
    # Spacing commands.
    ("10", "1\\!0", True),
    ("1000", "1\\,000", True),
    ("5", "\\displaystyle 5", True),
]


@pytest.mark.parametrize("gold, predicted, verdict", CASES)
def test_equivalence(gold, predicted, verdict):
  result = grade("math", boxed(predicted), gold)
  assert result.correct is verdict, result


def test_reference_is_full_solution_or_bare_answer():
  solution = "We have $x = 1/2$, so the answer is $\\boxed{\\frac{1}{2}}$."
  assert grade("math", boxed("0.5"), solution).correct
  assert grade("math", boxed("0.5"), " \\frac12 ").correct
  with pytest.raises(ValueError, match="reference"):
    grade("math", boxed("1"), "  ")


def test_no_answer():
  result = grade("math", "the answer is 5", "5")
  assert (result.correct, result.predicted) == (False, None)
  assert result.reason == "no \\boxed{} answer"


@pytest.mark.parametrize("response", ["so \\boxed{3", "so \\boxed{ }", "\\fbox{}"])
def test_a_box_that_cannot_be_read_says_so(response):
  result = grade("math", response, "3")
  assert (result.correct, result.predicted) == (False, None)
  assert "cannot be read" in result.reason


def test_batch_matches_single():
  responses = [boxed(p) for _, p, _ in CASES]
  references = [g for g, _, _ in CASES]
  grades = grade_batch("math", responses, references, num_workers=2)
  assert [g.correct for g in grades] == [v for _, _, v in CASES]
