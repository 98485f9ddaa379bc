"""MATH (Hendrycks et al. 2021): competition problems whose solutions end in \\boxed{}; `num_steps`
is the difficulty level, 1-5 (0 = "Level ?"). Its problems are never vendored here: the tests
use fixtures written in its layout."""

from __future__ import annotations

from dqo_jax.rewards import math_answer as grader
from dqo_jax.tasks import TaskSpec, prepared_loader

# Worked examples written for this project (none is taken from MATH), in its gold-solution
# style: LaTeX with a final \boxed{}.
EXEMPLARS = (
    (
        "What is the smallest positive integer $n$ such that $3n$ is a multiple of 4 and of 9?",
        "$3n$ must be a multiple of $\\operatorname{lcm}(4, 9) = 36$, so $3n \\ge 36$ and "
        "$n \\ge 12$. Since $3 \\cdot 12 = 36$ works, the answer is $\\boxed{12}$.",
    ),
    (
        "Simplify $\\frac{6}{\\sqrt{3}}$.",
        "Multiplying top and bottom by $\\sqrt{3}$ gives $\\frac{6\\sqrt{3}}{3} = "
        "\\boxed{2\\sqrt{3}}$.",
    ),
    (
        "For which real numbers $x$ is $2x - 5 > 1$? Express your answer in interval notation.",
        "Adding 5 gives $2x > 6$, so $x > 3$. The solution set is $\\boxed{(3, \\infty)}$.",
    ),
    (
        "Two fair six-sided dice are rolled. What is the probability that the sum is 4? Express "
        "your answer as a common fraction.",
        "Of the $36$ equally likely outcomes, $(1,3)$, $(2,2)$ and $(3,1)$ sum to 4, so the "
        "probability is $\\frac{3}{36} = \\boxed{\\frac{1}{12}}$.",
    ),
    (
        "Find the distance between the points $(1, 2)$ and $(4, 6)$.",
        "The distance is $\\sqrt{(4-1)^2 + (6-2)^2} = \\sqrt{9 + 16} = \\boxed{5}$.",
    ),
    (
        "If $f(x) = x^2 - 3x$, what is $f(-2)$?",
        "$f(-2) = (-2)^2 - 3(-2) = 4 + 6 = \\boxed{10}$.",
    ),
)


def _example(raw: dict) -> dict:
  return dict(
      question=raw["problem"],
      solution=raw["solution"],
      num_steps=raw["level"],
      answer=raw["answer"],
      level=raw["level"],
      subject=raw["subject"],
      unique_id=raw["unique_id"],
  )


TASK = TaskSpec(
    name="math",
    load=prepared_loader(
        "math", "math_tfds", "load_math", "math_builder", _example, lambda: EXEMPLARS
    ),
    grader=grader,
    answer_format="\\boxed{}",
    instruction=(
        "Solve the problem step by step. Put the final answer in \\boxed{}, simplified and in "
        "exact form."
    ),
    template="Problem: {question}\nSolution:\n",
    exemplars=lambda n: list(EXEMPLARS[:n]),
)
