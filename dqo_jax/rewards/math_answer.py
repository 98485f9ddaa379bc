"""Answer checking for MATH (Hendrycks et al.): the last boxed answer, compared up to equivalence.

Grading runs in two tiers. A fast path in this process normalizes both answers
as text (the PRM800K / Hendrycks `strip_string` rules plus a few more) and
decides exact matches, plain numbers and fractions, and plain words. Anything
else (radicals, pi, intervals, tuples, sets, matrices, expressions) goes to
Math-Verify in worker processes (`_pool`) with a hard wall-clock timeout and a
memory limit: model text is never parsed symbolically in this process, so a
hostile answer costs at most the timeout and is graded incorrect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from fractions import Fraction

from dqo_jax.rewards import _pool
from dqo_jax.rewards._latex import has_box, last_boxed

__all__ = ["DEFAULT_TIMEOUT", "check", "check_many", "extract_answer", "normalize"]

DEFAULT_TIMEOUT = 5.0
# Longer than any MATH answer (the longest gold answers are matrices of about
# 200 characters); longer text is not sent to a worker.
_MAX_ANSWER_CHARS = 1000
# Exponents in scientific notation beyond this are not legitimate answers and
# would make exact arithmetic expensive.
_MAX_EXPONENT = 400

_TEXT_COMMAND_RE = re.compile(
    r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\{([^{}]*)\}"
)
# A trailing unit after a number: "5 \text{ cm}", "5\text{cm}^2".
_UNIT_RE = re.compile(
    r"(?<=[0-9}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?[23]\}?)?$"
)
_FRAC_SHORTHAND_RE = re.compile(r"\\frac([0-9])([0-9])")
_FRAC_HALF_SHORTHAND_RE = re.compile(r"\\frac([0-9])\{")
_SQRT_SHORTHAND_RE = re.compile(r"\\sqrt([0-9a-zA-Z])")
# "x = 3", "f(x) = 3", "\theta = 3": a single named left-hand side.
_LHS_RE = re.compile(
    r"^(?:[A-Za-z](?:_\{?[0-9A-Za-z]+\}?)?|\\[A-Za-z]+|[A-Za-z]\([A-Za-z]\))=(?!=)"
)
_THOUSANDS_RE = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_NUMBER_RE = re.compile(
    r"(-?)(?:([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:(?:\\times|\\cdot|\*)10\^\{?(-?[0-9]+)\}?|e(-?[0-9]+))?"
    r"|\\frac\{(-?[0-9]+)\}\{(-?[0-9]+)\}|([0-9]+)/([0-9]+))"
)
# Words ("Monday") and choices ("(C)"); not one- or two-letter products like
# "xy", which are expressions.
_WORD_RE = re.compile(r"\([A-Za-z]\)|[A-Za-z]{3,}")


def normalize(answer: str) -> str:
  """Canonical text of an answer: the comparisons below work on this."""
  text = answer.strip()
  # Thin spaces and sizing commands never change the value.
  for noise in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\left", "\\right", "\\displaystyle", "$"):
    text = text.replace(noise, "")
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  text = text.replace("\u2212", "-")
  # Degrees and percent: the MATH gold answers drop them inconsistently, so,
  # like the PRM800K grader and Math-Verify, "30^\circ" == "30" and "5\%" == "5".
  for mark in ("^{\\circ}", "^\\circ", "\u00b0", "\\%", "%"):
    text = text.replace(mark, "")
  text = _UNIT_RE.sub("", text.strip())
  text = _TEXT_COMMAND_RE.sub(r"\1", text)
  text = "".join(text.split())
  text = _FRAC_SHORTHAND_RE.sub(r"\\frac{\1}{\2}", text)
  text = _FRAC_HALF_SHORTHAND_RE.sub(r"\\frac{\1}{", text)
  text = _SQRT_SHORTHAND_RE.sub(r"\\sqrt{\1}", text)
  text = text.rstrip(".")
  # "{{42}}" is 42; Math-Verify's parser is exponential in such nesting.
  while text.startswith("{") and text.endswith("}") and _balanced(text[1:-1]):
    text = text[1:-1]
  # "x=3" answers "3": like Math-Verify and Qwen2.5-Math's math_equal (the
  # PRM800K grader does not strip it).
  if (match := _LHS_RE.match(text)) is not None and "=" not in text[match.end() :]:
    text = text[match.end() :]
  if _THOUSANDS_RE.fullmatch(text):
    text = text.replace(",", "")
  return text


def _balanced(text: str) -> bool:
  depth = 0
  for char in text:
    depth += (char == "{") - (char == "}")
    if depth < 0:
      return False
  return depth == 0


def _number(text: str) -> Fraction | None:
  """The exact value of a plain number, fraction or scientific notation, else None."""
  match = _NUMBER_RE.fullmatch(text)
  if match is None:
    return None
  sign, digits, exponent, e_exponent, numerator, denominator, slash_num, slash_den = match.groups()
  if digits is not None:
    value = Fraction(digits if digits[-1] != "." else digits[:-1])
    exponent = exponent or e_exponent
    if exponent is not None:
      if abs(int(exponent)) > _MAX_EXPONENT:
        return None
      value *= Fraction(10) ** int(exponent)
  else:
    numerator, denominator = (
        (numerator, denominator) if numerator is not None else (slash_num, slash_den)
    )
    if int(denominator) == 0:
      return None
    value = Fraction(int(numerator), int(denominator))
  return -value if sign else value


def extract_answer(response: str) -> str | None:
  """The contents of the last `\\boxed{}` / `\\fbox{}` in `response`, or None."""
  boxed = last_boxed(response)
  return None if boxed is None or not boxed.strip() else boxed.strip()


def _reference_answer(reference: str) -> str:
  """A full MATH solution (its last \\boxed) or a bare answer."""
  answer = extract_answer(reference)
  if answer is None:
    answer = reference.strip()
  if not answer:
    raise ValueError(f"reference has no answer: {reference[:200]!r}")
  return answer


def _fast_verdict(gold: str, predicted: str) -> tuple[bool, str] | None:
  """(correct, reason) when text alone decides, else None (a worker must)."""
  gold_norm, predicted_norm = normalize(gold), normalize(predicted)
  if gold_norm == predicted_norm:
    return True, "correct (exact match)"
  gold_value, predicted_value = _number(gold_norm), _number(predicted_norm)
  if gold_value is not None and predicted_value is not None:
    # Exact comparison: a rounded decimal (0.33 for 1/3) is wrong, as in the
    # PRM800K grader (Qwen2.5-Math's math_equal would accept it within 1e-4).
    if gold_value == predicted_value:
      return True, "correct (equal numbers)"
    return False, f"wrong answer: expected {gold_norm}"
  if _WORD_RE.fullmatch(gold_norm) and _WORD_RE.fullmatch(predicted_norm):
    # Text answers ("Monday", "(C)") compare case-insensitively, as in Math-Verify.
    if gold_norm.casefold() == predicted_norm.casefold():
      return True, "correct (same text)"
    return False, f"wrong answer: expected {gold_norm}"
  if len(predicted) > _MAX_ANSWER_CHARS:
    return False, "answer too long to compare"
  return None


def check_many(
    responses: Sequence[str],
    references: Sequence[str],
    *,
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_bytes: int = _pool.DEFAULT_MEMORY_BYTES,
) -> list[tuple[bool, str | None, str]]:
  """(correct, predicted, reason) per response; symbolic checks run in parallel workers."""
  results: list[tuple[bool, str | None, str] | None] = []
  symbolic: list[tuple[int, str, str]] = []
  for response, reference in zip(responses, references, strict=True):
    gold = _reference_answer(reference)
    predicted = extract_answer(response)
    if predicted is None:
      reason = (
          "a \\boxed{} answer that cannot be read (empty or unbalanced braces)"
          if has_box(response)
          else "no \\boxed{} answer"
      )
      results.append((False, None, reason))
      continue
    verdict = _fast_verdict(gold, predicted)
    if verdict is None:
      symbolic.append((len(results), gold, predicted))
      results.append(None)
    else:
      results.append((verdict[0], predicted, verdict[1]))
  if symbolic:
    if num_workers is None:
      num_workers = min(8, os.cpu_count() or 1)
    verdicts = _pool.compare_many(
        [(gold, predicted) for _, gold, predicted in symbolic],
        num_workers=max(1, num_workers),
        timeout=timeout,
        memory_bytes=memory_bytes,
    )
    for (index, _, predicted), (equal, reason) in zip(symbolic, verdicts):
      results[index] = (equal, predicted, reason)
  return results


def check(
    response: str, reference: str, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[bool, str | None, str]:
  """Grades `response` against `reference` as (correct, predicted, reason)."""
  return check_many([response], [reference], num_workers=1, timeout=timeout)[0]
