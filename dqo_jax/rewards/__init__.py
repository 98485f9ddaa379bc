"""Grading of model responses and the rewards derived from them.

This package is imported by data, training and evaluation code alike, including
processes that must stay light: it must never import jax, flax or optax.

Each task module provides `check(response, reference) -> (correct, predicted,
reason)`; this module dispatches on the task name and wraps the result. "math"
also compares symbolically, in worker processes with a timeout (`math_answer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from dqo_jax.rewards import arith, gsm8k, math_answer

__all__ = ["Grade", "KNOWN_TASKS", "grade", "grade_batch", "reward_for"]

_CHECKERS: dict[str, Callable[[str, str], tuple[bool, str | None, str]]] = {
    "arith": arith.check,
    "gsm8k": gsm8k.check,
    "math": math_answer.check,
}
KNOWN_TASKS = tuple(sorted(_CHECKERS))


@dataclasses.dataclass(frozen=True)
class Grade:
  """Outcome of grading one response.

  `predicted` is the extracted answer in canonical form, or None when no
  answer could be extracted; `reason` is a short human-readable explanation.
  """

  correct: bool
  predicted: str | None
  reason: str


def _checker(task: str) -> Callable[[str, str], tuple[bool, str | None, str]]:
  try:
    return _CHECKERS[task]
  except KeyError:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}") from None


def grade(
    task: str, response: str, reference: str, *, timeout: float = math_answer.DEFAULT_TIMEOUT
) -> Grade:
  """Grades `response` for `task` against the dataset's `reference` field.

  For "arith" and "gsm8k", `reference` is either the full solution ("#### N",
  or "A: N" for GSM8K) or the bare answer "N"; for "math", the full solution
  (its last \\boxed{}) or the bare answer. `timeout` bounds the symbolic
  comparison of a "math" answer, in seconds; other tasks need none.
  """
  check = _checker(task)
  if task == "math":
    return Grade(*math_answer.check(response, reference, timeout=timeout))
  return Grade(*check(response, reference))


def grade_batch(
    task: str,
    responses: Sequence[str],
    references: Sequence[str],
    *,
    num_workers: int | None = None,
    timeout: float = math_answer.DEFAULT_TIMEOUT,
) -> list[Grade]:
  """`grade` over aligned sequences of responses and references.

  "math" answers that need a symbolic comparison are spread over `num_workers`
  processes (default: the CPU count, at most 8); the other tasks are cheap
  enough for a plain loop in this process.
  """
  if len(responses) != len(references):
    raise ValueError(f"got {len(responses)} responses but {len(references)} references")
  check = _checker(task)
  if task == "math":
    graded = math_answer.check_many(responses, references, num_workers=num_workers, timeout=timeout)
    return [Grade(*result) for result in graded]
  return [Grade(*check(r, ref)) for r, ref in zip(responses, references)]


def reward_for(
    grade: Grade, *, correct: float = 1.0, incorrect: float = 0.0, unparseable: float = 0.0
) -> float:
  """Maps a Grade to a scalar reward; `unparseable` is for no extracted answer."""
  if grade.predicted is None:
    return unparseable
  return correct if grade.correct else incorrect
