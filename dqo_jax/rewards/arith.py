"""Answer checking for "#### N"-style tasks (the arithmetic task, later GSM8K).

The answer is the number after the LAST "####" in a response. Responses come
from a policy under training and can be arbitrary, so every step here is
bounded: the response is capped, the number is read from a short window, and
the only regex is a linear, anchored match.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MARKER", "MAX_RESPONSE_CHARS", "check", "extract_answer", "parse_reference"]

MARKER = "####"

# Real responses are bounded by the generation budget (a few thousand tokens);
# anything longer is degenerate, so only its head is examined.
MAX_RESPONSE_CHARS = 1 << 16
# Longer than any legitimate answer; also keeps int() far below Python's
# digit limit for str -> int conversion.
_MAX_NUMBER_CHARS = 64

# ASCII digits only ([0-9], not \d) so that look-alike Unicode digits never
# count as an answer. Anchored and free of nested quantifiers: linear time.
_NUMBER_RE = re.compile(r"[ \t]*([+-]?)[ \t]*([0-9][0-9,]*)(?:\.([0-9]+))?")


def _parse_number(text: str, start: int = 0) -> tuple[Fraction, str] | None:
  """Reads the number at text[start:] as (exact value, canonical string)."""
  window = text[start : start + _MAX_NUMBER_CHARS + 1]
  match = _NUMBER_RE.match(window)
  # A match reaching past the cap means the number may continue: reject it
  # rather than silently grade a truncated number.
  if match is None or match.end() > _MAX_NUMBER_CHARS:
    return None
  sign, integer, fraction = match.groups()
  # Commas are thousands separators ("1,080"); exact fractions make
  # "28.0" == "28" without float rounding.
  digits = integer.replace(",", "")
  fraction = (fraction or "").rstrip("0")
  value = Fraction(f"{sign}{digits}.{fraction or '0'}")
  if value.denominator == 1:
    return value, str(value.numerator)
  return value, f"{'-' if value < 0 else ''}{int(digits)}.{fraction}"


def extract_answer(response: str) -> tuple[Fraction, str] | None:
  """The number after the last "####" in `response`, or None if there is none."""
  head = response[:MAX_RESPONSE_CHARS]
  position = head.rfind(MARKER)
  if position < 0:
    return None
  return _parse_number(head, position + len(MARKER))


def parse_reference(reference: str) -> Fraction:
  """The reference answer: a full solution ending in "#### N", or a bare "N"."""
  parsed = extract_answer(reference) if MARKER in reference else _parse_number(reference.strip())
  if parsed is None:
    raise ValueError(f"reference has no parseable answer: {reference[:200]!r}")
  return parsed[0]


def check(response: str, reference: str) -> tuple[bool, str | None, str]:
  """Grades `response` against `reference` as (correct, predicted, reason)."""
  expected = parse_reference(reference)
  if MARKER not in response[:MAX_RESPONSE_CHARS]:
    return False, None, f"no '{MARKER}' answer line"
  parsed = extract_answer(response)
  if parsed is None:
    return False, None, f"no number after the last '{MARKER}'"
  value, predicted = parsed
  if value == expected:
    return True, predicted, "correct"
  return False, predicted, f"wrong answer: expected {expected}"
