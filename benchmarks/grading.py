"""Grading throughput: `python -m benchmarks.grading` prints responses/s per task (median of repeats)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from dqo_jax.rewards import grade_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "example_model_solutions.jsonl")
_REPEATS = 5


def _rate(task: str, responses: list[str], references: list[str]) -> float:
  """Median responses/s over a few repeats (after one warm-up that starts any workers)."""
  grade_batch(task, responses, references)
  rates = []
  for _ in range(_REPEATS):
    start = time.perf_counter()
    grade_batch(task, responses, references)
    rates.append(len(responses) / (time.perf_counter() - start))
  return statistics.median(rates)


def main() -> None:
  if os.path.exists(SOLUTIONS):
    with open(SOLUTIONS, encoding="utf-8") as file:
      rows = [json.loads(line) for line in file]
    pairs = [
        (value["solution"], row["ground_truth"])
        for row in rows
        for value in row.values()
        if isinstance(value, dict) and "solution" in value
    ]
    rate = _rate("gsm8k", [p for p, _ in pairs], [g for _, g in pairs])
    print(f"gsm8k: {rate:,.0f} responses/s ({len(pairs)} example model solutions)")
  else:
    print(f"gsm8k: skipped, {SOLUTIONS} is absent", file=sys.stderr)
  sys.path.insert(0, ROOT)
  from tests.test_rewards_math import CASES, boxed  # pylint: disable=import-outside-toplevel

  # Typical answers: the plain numbers, fractions and words of the test table.
  typical = [(g, p) for g, p, _ in CASES if "\\" not in g + p and "(" not in g + p] * 50
  rate = _rate("math", [boxed(p) for _, p in typical], [g for g, _ in typical])
  print(f"math (typical answers): {rate:,.0f} responses/s ({len(typical)} answers)")
  rate = _rate("math", [boxed(p) for _, p, _ in CASES], [g for g, _, _ in CASES])
  print(f"math (whole test table, many symbolic): {rate:,.0f} responses/s ({len(CASES)} answers)")


if __name__ == "__main__":
  main()
