"""Grades a JSONL file of samples: `python -m dqo_jax.rewards --task gsm8k --input samples.jsonl --output graded.jsonl`.

Each input line is a JSON object with "response" and "reference" fields; each
output line is that object plus "correct", "predicted" and "reason". A line that
cannot be graded (invalid JSON or UTF-8, a missing field) is reported on stderr
with its number and written as {"line", "correct": false, "predicted": null,
"reason"} (left out with --skip_bad); the other lines are graded. The output is
written to a temporary file beside it and renamed, so it is complete or absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from dqo_jax.rewards import grade_batch, known_tasks, math_answer


def _parse_line(raw: bytes) -> dict:
  """The sample on one input line; raises ValueError saying what is wrong with it."""
  try:
    sample = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as error:
    raise ValueError(f"invalid UTF-8 at byte {error.start}") from None
  except json.JSONDecodeError as error:
    raise ValueError(f"invalid JSON ({error.msg})") from None
  if not isinstance(sample, dict):
    raise ValueError("expected a JSON object")
  for field in ("response", "reference"):
    if not isinstance(sample.get(field), str):
      raise ValueError(f"missing string field {field!r}")
  if not sample["reference"].strip():
    raise ValueError("empty 'reference'")
  return sample


def _read_samples(path: str) -> list[tuple[int, dict | str]]:
  """(line number, sample or why the line cannot be graded) per non-blank line of `path`."""
  try:
    with open(path, "rb") as file:
      lines = file.read().split(b"\n")
  except OSError as error:
    raise ValueError(f"cannot read {path}: {error.strerror}") from None
  out = []
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      out.append((number, _parse_line(raw)))
    except ValueError as error:
      out.append((number, str(error)))
  return out


def _open_output(path: str):
  """The temporary file the output is written to, created before grading starts so that a
  missing or unwritable directory is reported before any work is done."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    return tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False
    )
  except OSError as error:
    raise ValueError(
        f"cannot write --output={path} ({error.strerror}: {directory}); "
        "create the directory or choose another path"
    ) from None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dqo_jax.rewards", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--task", required=True, choices=known_tasks())
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--num-workers", type=int, default=None)
  parser.add_argument("--timeout", type=float, default=math_answer.DEFAULT_TIMEOUT)
  parser.add_argument(
      "--skip_bad", action="store_true", help="leave lines that cannot be graded out of --output"
  )
  args = parser.parse_args(argv)
  try:
    lines = _read_samples(args.input)
    file = _open_output(args.output)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  try:
    samples = [s for _, s in lines if isinstance(s, dict)]
    grades = grade_batch(
        args.task,
        [s["response"] for s in samples],
        [s["reference"] for s in samples],
        num_workers=args.num_workers,
        timeout=args.timeout,
    )
    results = iter(grades)
    bad = 0
    with file:
      for number, sample in lines:
        if isinstance(sample, dict):
          result = next(results)
          graded = dict(
              sample, correct=result.correct, predicted=result.predicted, reason=result.reason
          )
        else:
          bad += 1
          print(f"warning: {args.input}:{number}: {sample}; not graded", file=sys.stderr)
          if args.skip_bad:
            continue
          graded = dict(line=number, correct=False, predicted=None, reason=f"not graded: {sample}")
        file.write(json.dumps(graded, ensure_ascii=False) + "\n")
    os.replace(file.name, args.output)
  finally:
    if os.path.exists(file.name):
      os.remove(file.name)
  skipped = f", {bad} lines not graded" + (" (left out)" if args.skip_bad else "") if bad else ""
  print(
      f"graded {len(grades)} samples: {sum(g.correct for g in grades)} correct{skipped} "
      f"-> {args.output}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
