"""Grades a JSONL file of samples: `python -m dqo_jax.rewards --task gsm8k --input samples.jsonl --output graded.jsonl`.

Each input line is a JSON object with "response" and "reference" fields; each
output line is that object plus "correct", "predicted" and "reason". The
output is written to a temporary file and renamed, so it is complete or absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from dqo_jax.rewards import KNOWN_TASKS, grade_batch, math_answer


def _read_samples(path: str) -> list[dict]:
  """The samples in `path`; raises ValueError naming the file and line of any problem."""
  try:
    with open(path, encoding="utf-8") as file:
      lines = file.readlines()
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f"cannot read {path}: {error}") from None
  samples = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      sample = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
    if not isinstance(sample, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object")
    for field in ("response", "reference"):
      if not isinstance(sample.get(field), str):
        raise ValueError(f"{path}:{number}: missing string field {field!r}")
    samples.append(sample)
  return samples


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dqo_jax.rewards", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--task", required=True, choices=KNOWN_TASKS)
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--num-workers", type=int, default=None)
  parser.add_argument("--timeout", type=float, default=math_answer.DEFAULT_TIMEOUT)
  args = parser.parse_args(argv)
  try:
    samples = _read_samples(args.input)
    grades = grade_batch(
        args.task,
        [s["response"] for s in samples],
        [s["reference"] for s in samples],
        num_workers=args.num_workers,
        timeout=args.timeout,
    )
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  directory = os.path.dirname(os.path.abspath(args.output))
  with tempfile.NamedTemporaryFile(
      "w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False
  ) as file:
    for sample, result in zip(samples, grades):
      graded = dict(
          sample, correct=result.correct, predicted=result.predicted, reason=result.reason
      )
      file.write(json.dumps(graded, ensure_ascii=False) + "\n")
  os.replace(file.name, args.output)
  print(f"graded {len(grades)} samples: {sum(g.correct for g in grades)} correct -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
