"""Hostile responses: each is graded within the timeout, and incorrect unless legitimately right."""

import time

import pytest

from dqo_jax.rewards import grade, grade_batch

TIMEOUT = 1.0
# Start-up of a fresh worker after a kill is not charged to the answer, but the
# call as a whole must still return promptly.
LIMIT = TIMEOUT + 10.0

# Built lazily so that collection stays cheap and test ids stay short.
HOSTILE = {
    "power tower": lambda: "\\boxed{9**9**9}",
    "latex power tower": lambda: "\\boxed{10^{10^{10}}}",
    "python injection": lambda: "\\boxed{__import__('os').system('echo pwned')}",
    "bare injection": lambda: "__import__('os').system('echo pwned')",
    "megabyte of digits": lambda: "9" * 1_000_000,
    "boxed megabyte of digits": lambda: "\\boxed{" + "9" * 1_000_000 + "}",
    "10k nested braces": lambda: "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "10k nested fracs": lambda: "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "unicode digits": lambda: "\\boxed{\u0664\u0662}",
    "empty": lambda: "",
    "only a box": lambda: "\\boxed{}",
}


@pytest.mark.parametrize("task", ["math", "gsm8k"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_is_bounded_and_incorrect(task, name):
  start = time.monotonic()
  result = grade(task, HOSTILE[name](), "42", timeout=TIMEOUT)
  assert time.monotonic() - start < LIMIT
  # The megabyte of nines has a last number, but not 42.
  assert result.correct is False, result
  assert result.reason


@pytest.mark.parametrize(
    "task, response, correct",
    [
        ("math", "\\boxed{\u221242}", False),  # U+2212: -42, not 42
        ("math", "\\boxed{\u221242}", False),
        ("gsm8k", "A: \u221242", False),
        ("gsm8k", "A: 42", True),
        ("math", "\\boxed{" + "{" * 50 + "42" + "}" * 50 + "}", True),  # braces are grouping
    ],
)
def test_legitimate_answers_in_odd_form(task, response, correct):
  assert grade(task, response, "42", timeout=TIMEOUT).correct is correct


def test_batch_recovers_after_timeouts():
  responses = [
      "\\boxed{10^{10^{10}}}",
      "\\boxed{\\sqrt{8}}",
      "\\boxed{10^{10^{10}}}",
      "\\boxed{2\\sqrt2}",
  ]
  start = time.monotonic()
  grades = grade_batch("math", responses, ["2\\sqrt{2}"] * 4, num_workers=2, timeout=TIMEOUT)
  assert time.monotonic() - start < 2 * LIMIT
  assert [g.correct for g in grades] == [False, True, False, True]
  assert "timed out" in grades[0].reason
