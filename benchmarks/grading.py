"""Grading throughput (responses/s, median of repeats): GSM8K on OpenAI's example model
solutions (data/gsm8k), MATH on this file's own MATH-style responses (no MATH problems are
included).

    python -m benchmarks.grading          # or as rows of `python -m benchmarks.run`
"""

from __future__ import annotations

import json
import os
import statistics

from benchmarks.timing import interleaved, row
from dqo_jax.rewards import grade_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(ROOT, "data", "gsm8k", "example_model_solutions.jsonl")

# (response, reference answer, whether it grades correct): written for this benchmark in the
# style of MATH solutions: a short derivation ending in \boxed{}. "typical" answers need no
# symbolic comparison; "symbolic" ones (radicals, pi, equivalent forms) go to the sympy workers.
MATH_TYPICAL = [
    ("Adding the two counts gives $12 + 30 = 42$, so the answer is $\\boxed{42}$.", "42", True),
    (
        "The probability is $\\frac{3}{8}$ after cancelling, so $\\boxed{\\frac{3}{8}}$.",
        "\\frac{3}{8}",
        True,
    ),
    ("Solving $2x - 7 = 0$ gives $x = \\boxed{3.5}$.", "\\frac{7}{2}", True),
    ("The remainder when $2^{10}$ is divided by $7$ is $\\boxed{2}$.", "2", True),
    ("There are $\\binom{6}{2} = 15$ pairs, so the answer is $\\boxed{15}$.", "16", False),
    ("The angle measures $\\boxed{72^\\circ}$.", "72", True),
    ("The smallest such integer is $\\boxed{-4}$.", "-4", True),
    ("So the area is $\\boxed{18\\text{ square units}}$.", "18", True),
]
MATH_SYMBOLIC = [
    ("The distance is $\\sqrt{3^2 + 3^2} = \\boxed{3\\sqrt{2}}$.", "\\sqrt{18}", True),
    ("The circle's area is $\\boxed{16\\pi}$.", "16\\pi", True),
    ("Expanding, we get $\\boxed{x^2 + 2x + 1}$.", "(x+1)^2", True),
    ("The roots are $\\boxed{2, -3}$.", "-3, 2", True),
    ("The interval is $\\boxed{(-\\infty, 4]}$.", "(-\\infty, 4]", True),
    ("So $\\frac{\\sqrt{8}}{2} = \\boxed{\\sqrt{2}}$.", "\\frac{2}{\\sqrt{2}}", True),
    ("The volume is $\\boxed{\\frac{4}{3}\\pi}$.", "\\frac{4\\pi}{3}", True),
    ("The sum is $\\boxed{2\\sqrt{3}}$.", "3\\sqrt{2}", False),
]


def gsm8k_pairs(path: str = SOLUTIONS) -> list[tuple[str, str]]:
  """(model solution, ground truth) for every model's solution in the example file."""
  with open(path, encoding="utf-8") as file:
    records = [json.loads(line) for line in file]
  return [
      (value["solution"], record["ground_truth"])
      for record in records
      for value in record.values()
      if isinstance(value, dict) and "solution" in value
  ]


def _rate_row(name, task, pairs, repeats, notes):
  responses, references = [p[0] for p in pairs], [p[1] for p in pairs]
  seconds = interleaved({task: lambda: grade_batch(task, responses, references)}, repeats)[task]
  return row(name, len(pairs) / statistics.median(seconds), unit="responses/s", notes=notes)


def rows(quick: bool) -> list[dict]:
  repeats = 3 if quick else 7
  pairs = gsm8k_pairs()
  notes = f"{len(pairs)} example model solutions"
  out = [_rate_row("grading GSM8K", "gsm8k", pairs, repeats, notes)]
  for name, cases, copies in (("typical", MATH_TYPICAL, 50), ("symbolic", MATH_SYMBOLIC, 5)):
    pairs = [(response, reference) for response, reference, _ in cases] * copies
    out.append(
        _rate_row(
            f"grading MATH ({name})",
            "math",
            pairs,
            repeats,
            f"{len(cases)} own MATH-style responses x {copies}",
        )
    )
  return out


if __name__ == "__main__":
  for r in rows(quick=False):
    print(f"{r['name']}: {r['ours']:,.0f} {r['unit']} ({r['notes']})")
