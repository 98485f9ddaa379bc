"""Answer checking for GSM8K: a single number, however the response states it.

The final answer is taken from, in order of precedence, the last "#### N"
line, the last `\\boxed{N}`, the last "The answer is N", the last "Answer: N"
or "A: N", and otherwise the last number in the response. Answers compare as
exact numbers (18 == 18.00 == 18.), never by rescaling percentages: GSM8K
answers are quantities, and "25%" answers a question whose answer is 25.
"""

from __future__ import annotations

import re
from fractions import Fraction

from dqo_jax.rewards._latex import MAX_RESPONSE_CHARS, last_boxed

__all__ = ["check", "extract_answer", "parse_reference"]

# Longer than any legitimate answer; keeps int() far below Python's digit
# limit for str -> int conversion.
_MAX_NUMBER_CHARS = 64

# Text that may sit between a marker and its number: spaces, markdown bold,
# colons, LaTeX math delimiters and a (possibly escaped) dollar sign. The sign
# may come before or after the "$" ("-$5", "$-5"). ASCII digits only, so
# look-alike Unicode digits never count as an answer; U+2212 is a minus sign.
# No nested quantifiers: linear time.
_NUMBER = (
    r"([+\-\u2212]?)[ \t]*(?:\\?\$)?[ \t]*"
    r"([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)(?:[ \t]*/[ \t]*([0-9]+)(?![0-9.]))?"
)
_LEADING = r"[\s*:=]*(?:\\\(|\\\[|\\?\$|\*\*)*[\s*]*"
_AFTER_MARKER_RE = re.compile(_LEADING + _NUMBER)
# In running text a sign only counts when attached and not after an operand:
# the last number of "10 - 3" or "10-3" is 3, not -3.
_ANY_NUMBER_RE = re.compile(
    r"((?<![0-9A-Za-z)\]}.])[+\-\u2212])?(?:\\?\$)?"
    r"([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)(?:[ \t]*/[ \t]*([0-9]+)(?![0-9.]))?"
)
# Markers, each matched at its last occurrence. "A:" must start a word so that
# "NASA: 5" is not an answer line.
_ANSWER_IS_RE = re.compile(r"answer is", re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(r"(?:\banswer|(?<![A-Za-z])A)[ \t]*:", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")


def _to_number(match: re.Match[str]) -> tuple[Fraction, str] | None:
  """(exact value, canonical string) for a `_NUMBER` match."""
  sign, digits, denominator = match.group(1) or "", match.group(2), match.group(3)
  if len(digits) > _MAX_NUMBER_CHARS:
    return None
  digits = digits.rstrip(",")
  if "," in digits:
    # "1,080" is a thousand separator; "3,4" is a list, whose last item wins.
    digits = (
        digits.replace(",", "") if _THOUSANDS_RE.fullmatch(digits) else digits.rsplit(",", 1)[1]
    )
    if not digits:
      return None
  value = Fraction(digits)
  if denominator is not None:
    if len(denominator) > _MAX_NUMBER_CHARS or int(denominator) == 0:
      return None
    value /= int(denominator)
  if sign in ("-", "\u2212"):
    value = -value
  if value.denominator == 1:
    return value, str(value.numerator)
  if denominator is None:
    # A terminating decimal: print its digits rather than a rounded float.
    whole, _, fraction = digits.partition(".")
    return value, f"{'-' if value < 0 else ''}{int(whole or '0')}.{fraction.rstrip('0')}"
  return value, f"{value.numerator}/{value.denominator}"


def _number_after(text: str, position: int) -> tuple[Fraction, str] | None:
  match = _AFTER_MARKER_RE.match(text, position, position + 2 * _MAX_NUMBER_CHARS)
  return None if match is None else _to_number(match)


def _last_number(text: str) -> tuple[Fraction, str] | None:
  last = None
  for last in _ANY_NUMBER_RE.finditer(text):
    pass
  return None if last is None else _to_number(last)


def _last_marker(pattern: re.Pattern[str], text: str) -> int:
  """End of the last match of `pattern` in `text`, or -1."""
  end = -1
  for match in pattern.finditer(text):
    end = match.end()
  return end


def extract_answer(response: str) -> tuple[tuple[Fraction, str] | None, str]:
  """((value, canonical string) or None, which rule found it) for `response`."""
  text = response[-MAX_RESPONSE_CHARS:]
  position = text.rfind("####")
  if position >= 0 and (number := _number_after(text, position + 4)) is not None:
    return number, "'####' line"
  if (boxed := last_boxed(text)) is not None and (number := _number_after(boxed, 0)) is not None:
    return number, "\\boxed{}"
  for pattern, rule in ((_ANSWER_IS_RE, "'the answer is'"), (_ANSWER_LINE_RE, "'Answer:' line")):
    position = _last_marker(pattern, text)
    if position >= 0 and (number := _number_after(text, position)) is not None:
      return number, rule
  return _last_number(text), "last number"


def parse_reference(reference: str) -> Fraction:
  """The reference answer: a full GSM8K answer ("#### N" or "A: N") or a bare "N"."""
  parsed, _ = extract_answer(reference)
  if parsed is None:
    raise ValueError(f"reference has no parseable answer: {reference[:200]!r}")
  return parsed[0]


def check(response: str, reference: str) -> tuple[bool, str | None, str]:
  """Grades `response` against `reference` as (correct, predicted, reason)."""
  expected = parse_reference(reference)
  parsed, rule = extract_answer(response)
  if parsed is None:
    return False, None, "no number in the response"
  value, predicted = parsed
  if value == expected:
    return True, predicted, f"correct (from {rule})"
  return False, predicted, f"wrong answer from {rule}: expected {expected}"
