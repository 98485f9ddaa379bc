"""Tests for answer grading and rewards."""

import subprocess
import sys
import time

import pytest

from dqo_jax.rewards import Grade, grade, grade_batch, reward_for

SOLUTION = "12+7=19\n19-5=14\n14*2=28\n#### 28"


def test_correct_incorrect_unparseable():
  assert grade("arith", SOLUTION, SOLUTION) == Grade(True, "28", "correct")

  wrong = grade("arith", "12+7=19\n#### 27", SOLUTION)
  assert (wrong.correct, wrong.predicted) == (False, "27")
  assert "28" in wrong.reason

  missing = grade("arith", "the answer is 28", SOLUTION)
  assert missing == Grade(False, None, "no '####' answer line")

  empty = grade("arith", "#### ", SOLUTION)
  assert (empty.correct, empty.predicted) == (False, None)


@pytest.mark.parametrize(
    "response, reference, predicted, correct",
    [
        ("#### 5\n#### 28", "28", "28", True),  # the last marker wins
        ("#### 28\n#### 5", "28", "5", False),
        ("#### 1,080", "1080", "1080", True),
        ("#### -3", "-3", "-3", True),
        ("####-3", "#### -3", "-3", True),
        ("#### - 3", "-3", "-3", True),
        ("#### +4", "4", "4", True),
        ("#### 28.0", "28", "28", True),
        ("#### 2.5", "#### 2.50", "2.5", True),
        ("#### -0,002.500", "-2.5", "-2.5", True),
        ("#### -0", "0", "0", True),
        ("#### 28.", "28", "28", True),
        ("#### 28 marbles", SOLUTION, "28", True),
        ("##### 28", "28", "28", True),
        ("\t####\t28\n", "28", "28", True),
        ("#### 007", "7", "7", True),
        ("####\n28", "28", None, False),  # the answer must be on the marker's line
        ("#### twenty", "28", None, False),
        ("#### \u0662\u0668", "28", None, False),  # Arabic-Indic digits are not ASCII
    ],
)
def test_extraction(response, reference, predicted, correct):
  result = grade("arith", response, reference)
  assert (result.predicted, result.correct) == (predicted, correct)


def test_reference_as_full_solution_or_bare_number():
  for reference in (SOLUTION, "28", " 28\n", "#### 28"):
    assert grade("arith", "#### 28", reference).correct


def test_bad_reference_and_unknown_task():
  with pytest.raises(ValueError, match="reference"):
    grade("arith", "#### 1", "no answer here")
  with pytest.raises(ValueError, match="arith"):
    grade("gsm9k", "#### 1", "1")


def test_reward_for():
  assert reward_for(grade("arith", "#### 28", "28")) == 1.0
  assert reward_for(grade("arith", "#### 27", "28")) == 0.0
  assert reward_for(grade("arith", "28", "28")) == 0.0
  kwargs = dict(correct=2.0, incorrect=-1.0, unparseable=-5.0)
  assert reward_for(grade("arith", "#### 28", "28"), **kwargs) == 2.0
  assert reward_for(grade("arith", "#### 27", "28"), **kwargs) == -1.0
  assert reward_for(grade("arith", "no answer", "28"), **kwargs) == -5.0
  assert reward_for(grade("arith", "#### x", "28"), **kwargs) == -5.0


def test_grade_batch():
  grades = grade_batch("arith", ["#### 28", "#### 1", "?"], [SOLUTION, "2", "3"])
  assert [g.correct for g in grades] == [True, False, False]
  assert grades[2].predicted is None
  with pytest.raises(ValueError):
    grade_batch("arith", ["#### 1"], [])


# Built lazily so that collection stays cheap and test ids stay short; each is refused, with the
# reason it gets.
NO_NUMBER, NO_LINE = "no number after the last '####'", "no '####' answer line"
_HOSTILE = {
    "10MB digits after marker": (lambda: "#### " + "9" * 10_000_000, NO_NUMBER),
    "10MB digits": (lambda: "9" * 10_000_000, NO_LINE),
    "10MB hashes": (lambda: "#" * 10_000_000, NO_NUMBER),
    "10MB commas": (lambda: "#### 1" + "," * 10_000_000, NO_NUMBER),
    "10MB spaces": (lambda: "#### " + " " * 10_000_000 + "1", NO_NUMBER),
    "9M non-ascii then marker": (lambda: "\u00e9\u4e2d\U0001f600" * 3_000_000 + "#### 1", NO_LINE),
    "3M markers": (lambda: "####" * 3_000_000, NO_NUMBER),
    "5M digit-comma pairs": (lambda: "#### " + "1," * 5_000_000, NO_NUMBER),
}


@pytest.mark.parametrize("make_response, reason", _HOSTILE.values(), ids=_HOSTILE.keys())
def test_hostile_inputs_are_refused_in_linear_time(make_response, reason):
  response = make_response()
  start = time.perf_counter()
  result = grade("arith", response, "1")
  # A hang guard, not a speed target: each takes under 0.1 s here, and a regular expression that
  # backtracked over these 10 MB would take hours.
  assert time.perf_counter() - start < 10
  assert result == Grade(correct=False, predicted=None, reason=reason)


def test_importing_rewards_does_not_import_jax():
  code = (
      "import sys, dqo_jax.rewards; "
      "heavy = {'jax', 'flax', 'optax', 'tensorflow'} & set(sys.modules); "
      "assert not heavy, heavy"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
