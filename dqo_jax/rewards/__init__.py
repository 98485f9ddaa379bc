"""Grading of model responses and the rewards derived from them.

This package is imported by data, training and evaluation code alike, including
processes that must stay light: it must never import jax, flax or optax.

Each task module provides `check(response, reference) -> (correct, predicted,
reason)`; this module dispatches on the task name and wraps the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from dqo_jax.rewards import arith

__all__ = ["Grade", "KNOWN_TASKS", "grade", "grade_batch", "reward_for"]

_CHECKERS: dict[str, Callable[[str, str], tuple[bool, str | None, str]]] = {
    "arith": arith.check,
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


def grade(task: str, response: str, reference: str) -> Grade:
  """Grades `response` for `task` against the dataset's `reference` field.

  For "arith", `reference` is either the full solution ending in "#### N" or
  the bare answer "N".
  """
  return Grade(*_checker(task)(response, reference))


def grade_batch(task: str, responses: Sequence[str], references: Sequence[str]) -> list[Grade]:
  """`grade` over aligned sequences of responses and references."""
  if len(responses) != len(references):
    raise ValueError(f"got {len(responses)} responses but {len(references)} references")
  check = _checker(task)
  return [Grade(*check(r, ref)) for r, ref in zip(responses, references)]


def reward_for(
    grade: Grade, *, correct: float = 1.0, incorrect: float = 0.0, unparseable: float = 0.0
) -> float:
  """Maps a Grade to a scalar reward; `unparseable` is for no extracted answer."""
  if grade.predicted is None:
    return unparseable
  return correct if grade.correct else incorrect
