"""Worker process for symbolic answer comparison (MATH), run by `_pool`.

Protocol: one JSON object per line on stdin, {"gold": str, "predicted": str};
one JSON object per line on stdout, {"equal": bool, "reason": str}. The first
line written is "ready", once the heavy imports are done, so that the parent's
per-answer timeout does not include start-up.

Model text is parsed here and only here: a hostile answer can exhaust this
process's time (the parent kills it) or memory (capped with RLIMIT_AS below),
never the trainer's.
"""

from __future__ import annotations

import json
import resource
import sys


def _compare(math_verify, gold: str, predicted: str) -> tuple[bool, str]:
  """Math-Verify equivalence of two boxed answers (gold first: it is asymmetric)."""
  # Wrapping in \boxed makes Math-Verify read the whole answer as one LaTeX
  # expression rather than searching it for a sub-answer.
  # LaTeX extraction only: Math-Verify's plain-expression extraction goes
  # through sympy's parse_expr, which evaluates Python.
  config = [math_verify.LatexExtractionConfig()]
  gold_parsed = math_verify.parse(f"\\boxed{{{gold}}}", config, parsing_timeout=None)
  predicted_parsed = math_verify.parse(f"\\boxed{{{predicted}}}", config, parsing_timeout=None)
  if not gold_parsed or not predicted_parsed:
    return False, "symbolic: could not parse the answer"
  if math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=None):
    return True, "correct (symbolically equivalent)"
  return False, "wrong answer (not symbolically equivalent)"


def main() -> None:
  memory_bytes = int(sys.argv[1])
  import math_verify  # pylint: disable=import-outside-toplevel

  # Limit after the imports, which need their own address space; what is left
  # bounds any one comparison.
  if memory_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  # Numbers with millions of digits are never legitimate answers.
  sys.set_int_max_str_digits(10_000)
  out = sys.stdout
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    request = json.loads(line)
    try:
      equal, reason = _compare(math_verify, request["gold"], request["predicted"])
    except MemoryError:
      equal, reason = False, "symbolic comparison ran out of memory"
    except Exception as error:  # pylint: disable=broad-except
      # Any failure to compare is a failure to show equivalence.
      equal, reason = False, f"symbolic comparison failed: {type(error).__name__}"
    out.write(json.dumps({"equal": equal, "reason": reason}) + "\n")
    out.flush()


if __name__ == "__main__":
  main()
