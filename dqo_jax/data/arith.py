"""Seeded generator of multi-step arithmetic word problems.

Each problem starts from a quantity and applies a short chain of +, -, * and
exact / operations. Questions come from a few templates over a deliberately
small vocabulary (so a 256-piece SentencePiece model covers them), and every
solution is written one arithmetic step per line, ending in a "#### N" line:

    12+7=19
    19-5=14
    14*2=28
    #### 28

Pure Python on purpose: data generation must not depend on jax or numpy, and
`random.Random(seed)` with an int seed gives the same stream on every platform.
"""

from __future__ import annotations

import dataclasses
import random

__all__ = ["Problem", "generate_problem", "generate_split"]

# (name, pronoun) pairs; the pronoun starts the per-step sentences.
_PEOPLE = (
    ("Mia", "She"),
    ("Ava", "She"),
    ("Zoe", "She"),
    ("Leo", "He"),
    ("Sam", "He"),
    ("Max", "He"),
)
_OBJECTS = ("marbles", "apples", "stickers", "coins", "books", "cards")

_STEP_TEMPLATES = {
    "+": ("{pr} finds {n} more.", "{pr} buys {n} more.", "{pr} gets {n} more."),
    "-": ("{pr} loses {n}.", "{pr} gives away {n}.", "{pr} sells {n}."),
    "*": ("{pr} then has {n} times as many.", "{pr} multiplies them by {n}."),
    "/": (
        "{pr} splits them into {n} equal groups and keeps one group.",
        "{pr} keeps one of {n} equal parts.",
    ),
}
# Special-cased wording for the most natural multipliers.
_NAMED_MULTIPLIERS = {2: "{pr} then doubles them.", 3: "{pr} then triples them."}

_OPS = ("+", "-", "*", "/")
_MULTIPLIERS = range(2, 6)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One word problem with its step-by-step solution."""

  question: str
  solution: str
  answer: int
  num_steps: int


def _valid_operands(op: str, value: int, max_operand: int, max_result: int) -> list[int]:
  """Operands for `op` that keep `value op operand` an integer in [0, max_result]."""
  if op == "+":
    return list(range(1, min(max_operand, max_result - value) + 1))
  if op == "-":
    return list(range(1, min(max_operand, value) + 1))
  if op == "*":
    return [m for m in _MULTIPLIERS if value * m <= max_result]
  # Dividing by 1 would be a no-op step, so divisors start at 2.
  return [d for d in range(2, max_operand + 1) if value % d == 0]


def _apply(op: str, value: int, operand: int) -> int:
  if op == "+":
    return value + operand
  if op == "-":
    return value - operand
  if op == "*":
    return value * operand
  return value // operand


def _step_sentence(rng: random.Random, op: str, operand: int, pronoun: str) -> str:
  if op == "*" and operand in _NAMED_MULTIPLIERS:
    template = _NAMED_MULTIPLIERS[operand]
  else:
    template = rng.choice(_STEP_TEMPLATES[op])
  return template.format(pr=pronoun, n=operand)


def generate_problem(
    rng: random.Random,
    num_steps: int,
    max_operand: int = 20,
    max_result: int = 99,
) -> Problem:
  """Draws one problem with `num_steps` operations from `rng`.

  Every intermediate result stays in [0, max_result]; an operation whose
  operands would all leave that range is resampled.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if max_operand < 1 or max_result < 1:
    raise ValueError(f"max_operand and max_result must be >= 1, got {max_operand}, {max_result}")

  name, pronoun = rng.choice(_PEOPLE)
  obj = rng.choice(_OBJECTS)
  # A start of at most 2*max_operand leaves room for multiplication early on.
  value = rng.randint(1, min(max_result, 2 * max_operand))

  sentences = [f"{name} has {value} {obj}."]
  lines = []
  for _ in range(num_steps):
    # Terminates: from any value in [0, max_result >= 1] either +1 or -1 is valid.
    while True:
      op = rng.choice(_OPS)
      operands = _valid_operands(op, value, max_operand, max_result)
      if operands:
        break
    operand = rng.choice(operands)
    result = _apply(op, value, operand)
    sentences.append(_step_sentence(rng, op, operand, pronoun))
    lines.append(f"{value}{op}{operand}={result}")
    value = result

  sentences.append(f"How many {obj} does {name} have now?")
  lines.append(f"#### {value}")
  return Problem(
      question=" ".join(sentences),
      solution="\n".join(lines),
      answer=value,
      num_steps=num_steps,
  )


def generate_split(
    seed: int,
    num_examples: int,
    min_steps: int = 2,
    max_steps: int = 5,
    max_operand: int = 20,
    max_result: int = 99,
) -> list[Problem]:
  """Generates `num_examples` problems, num_steps uniform in [min_steps, max_steps].

  The output is a pure function of the arguments.
  """
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
  rng = random.Random(seed)
  return [
      generate_problem(rng, rng.randint(min_steps, max_steps), max_operand, max_result)
      for _ in range(num_examples)
  ]
