"""Grading of model responses and the rewards derived from them.

This package is imported by data, training and evaluation code alike, including
processes that must stay light: it must never import jax, flax or optax.

Each task's grader module provides `check(response, reference) -> (correct,
predicted, reason)`; the task registry (`dqo_jax.tasks`, which imports no jax
either) says which module grades which task, and this module wraps the result.
A grader with `check_many` ("math", `math_answer`) also compares symbolically, in
worker processes with a timeout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dqo_jax.rewards import math_answer

__all__ = ["Grade", "grade", "grade_batch", "known_tasks", "reward_for"]


def known_tasks() -> tuple[str, ...]:
  from dqo_jax import tasks  # pylint: disable=g-import-not-at-top

  return tuple(sorted(tasks.registry()))


@dataclasses.dataclass(frozen=True)
class Grade:
  """Outcome of grading one response.

  `predicted` is the extracted answer in canonical form, or None when no
  answer could be extracted; `reason` is a short human-readable explanation.
  """

  correct: bool
  predicted: str | None
  reason: str


def _grader(task: str):
  """The module that grades `task` (`dqo_jax.tasks`: imported here, not at the top, since the
  task modules import their graders from this package)."""
  from dqo_jax import tasks  # pylint: disable=g-import-not-at-top

  return tasks.get(task).grader


def grade(
    task: str, response: str, reference: str, *, timeout: float = math_answer.DEFAULT_TIMEOUT
) -> Grade:
  """Grades `response` for `task` against the dataset's `reference` field.

  For "arith" and "gsm8k", `reference` is either the full solution ("#### N",
  or "A: N" for GSM8K) or the bare answer "N"; for "math", the full solution
  (its last \\boxed{}) or the bare answer. `timeout` bounds the symbolic
  comparison of a "math" answer, in seconds; other tasks need none.
  """
  grader = _grader(task)
  if hasattr(grader, "check_many"):  # the graders with a symbolic comparison take its timeout
    return Grade(*grader.check(response, reference, timeout=timeout))
  return Grade(*grader.check(response, reference))


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
  grader = _grader(task)
  if hasattr(grader, "check_many"):
    graded = grader.check_many(responses, references, num_workers=num_workers, timeout=timeout)
    return [Grade(*result) for result in graded]
  return [Grade(*grader.check(r, ref)) for r, ref in zip(responses, references)]


def reward_for(
    grade: Grade, *, correct: float = 1.0, incorrect: float = 0.0, unparseable: float = 0.0
) -> float:
  """Maps a Grade to a scalar reward; `unparseable` is for no extracted answer."""
  if grade.predicted is None:
    return unparseable
  return correct if grade.correct else incorrect
