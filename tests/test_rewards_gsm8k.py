"""Tests for GSM8K answer grading."""

import json
import os
import subprocess
import sys

import pytest

from dqo_jax.rewards import __main__ as rewards_cli
from dqo_jax.rewards import grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(ROOT, "data", "gsm8k", "example_model_solutions.jsonl")
REFERENCE = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


@pytest.mark.parametrize(
    "response, reference, predicted, correct",
    [
        # Markers and their precedence.
        ("#### 18", REFERENCE, "18", True),
        ("So 9*2=18.\n#### 18", "18", "18", True),
        ("#### 17\nA: 18", "18", "17", False),  # "####" beats "A:"
        ("The answer is 18. #### 17", "18", "17", False),
        ("$\\boxed{18}$ and then 20", "18", "18", True),  # \boxed beats the last number
        ("\\boxed{17} The answer is 18", "18", "17", False),
        ("The answer is 18. That is 9 * 2.", "18", "18", True),
        ("the answer is: 18", "18", "18", True),
        ("The final answer is $18.", "18", "18", True),
        ("Answer: 18", "18", "18", True),
        ("A: 18", "A: 18", "18", True),  # the example_model_solutions reference style
        ("A:18", "18", "18", True),
        ("NASA: 5 rockets, 18 total", "18", "18", True),  # "NASA:" is no answer line
        ("9 * 2 = 18", "18", "18", True),  # the last number
        ("18 eggs minus 3", "18", "3", False),
        ("no numbers here", "18", None, False),
        ("", "18", None, False),
        ("The answer is eighteen, not 17", "18", "17", False),  # falls back to the last number
        # Formatting of the number.
        ("#### 1,080", "1080", "1080", True),
        ("#### 1080", "#### 1,080", "1080", True),
        ("A: 1,000,000", "1000000", "1000000", True),
        ("A: $1,000.", "1000", "1000", True),
        ("A: \\$18", "18", "18", True),
        ("The answer is $18.00.", "18", "18", True),
        ("#### 18.0", "18", "18", True),
        ("#### 18.", "18", "18", True),
        ("#### 018", "18", "18", True),
        ("#### 2.5", "2.50", "2.5", True),
        ("#### .5", "0.5", "0.5", True),
        ("#### 2.5", "3", "2.5", False),
        ("#### -3", "-3", "-3", True),
        ("#### -$3", "-3", "-3", True),
        ("#### $-3", "-3", "-3", True),
        ("#### \u22123", "-3", "-3", True),  # U+2212 minus sign
        ("#### +4", "4", "4", True),
        ("#### 3", "-3", "3", False),
        ("She lost 10 - 3 = 7", "7", "7", True),
        ("It is 10-3", "3", "3", True),  # a binary minus is not a sign
        ("x=-3", "-3", "-3", True),
        ("A: 18 dollars", "18", "18", True),
        ("A: 18 eggs.", "18", "18", True),
        ("A: **18**", "18", "18", True),
        ("A: \\(18\\)", "18", "18", True),
        ("A: 7/2", "3.5", "7/2", True),
        ("A: 7/0", "3.5", None, False),
        # Percentages are numbers, never rescaled.
        ("A: 25%", "25", "25", True),
        ("A: 25%", "0.25", "25", False),
        ("A: 0.25", "25", "0.25", False),
        # Unicode look-alike digits are not digits.
        ("#### \u0661\u0668", "18", None, False),
        ("A: \uff11\uff18", "18", None, False),
        # Lists: the last item.
        ("A: 3,4", "4", "4", True),
        ("A: 12,34", "34", "34", True),
        ("A: 18,", "18", "18", True),
        # Numbers too long to be answers.
        ("#### " + "9" * 100, "18", None, False),
    ],
)
def test_extraction(response, reference, predicted, correct):
  result = grade("gsm8k", response, reference)
  assert (result.predicted, result.correct) == (predicted, correct), result


def test_bad_reference():
  with pytest.raises(ValueError, match="reference"):
    grade("gsm8k", "#### 1", "no answer here")


def _labelled_solutions():
  with open(SOLUTIONS, encoding="utf-8") as file:
    rows = [json.loads(line) for line in file]
  return [
      (value["solution"], row["ground_truth"], value["is_correct"])
      for row in rows
      for value in row.values()
      if isinstance(value, dict) and "is_correct" in value
  ]


def test_agrees_with_labels_on_example_model_solutions():
  solutions = _labelled_solutions()
  disagreements = [
      (solution[-120:], reference[-30:], label)
      for solution, reference, label in solutions
      if grade("gsm8k", solution, reference).correct != label
  ]
  for disagreement in disagreements:
    print("disagreement:", disagreement)
  assert len(solutions) > 5000
  assert len(disagreements) <= 0.005 * len(solutions), disagreements


def test_cli(tmp_path):
  samples = tmp_path / "samples.jsonl"
  samples.write_text(
      json.dumps({"response": "A: 18", "reference": REFERENCE, "id": 7})
      + "\n"
      + json.dumps({"response": "A: 17", "reference": "18"})
      + "\n"
  )
  output = tmp_path / "graded.jsonl"
  command = [sys.executable, "-m", "dqo_jax.rewards", "--task", "gsm8k"]
  subprocess.run(command + ["--input", str(samples), "--output", str(output)], check=True, cwd=ROOT)
  graded = [json.loads(line) for line in output.read_text().splitlines()]
  assert [(g["id"] if "id" in g else None, g["correct"], g["predicted"]) for g in graded] == [
      (7, True, "18"),
      (None, False, "17"),
  ]


def test_cli_grades_the_good_lines_and_reports_the_bad_ones(tmp_path, capsys):
  """One bad line (JSON, UTF-8, a missing field) used to reject the whole file."""
  samples = tmp_path / "samples.jsonl"
  good = json.dumps({"response": "A: 18", "reference": "18"}).encode()
  samples.write_bytes(b"\n".join([good, b"{oops", b"\xff\xfe", b'{"response": "A: 1"}', good]))
  output = tmp_path / "graded.jsonl"
  argv = ["--task", "gsm8k", "--input", str(samples), "--output", str(output)]
  assert rewards_cli.main(argv) == 0
  graded = [json.loads(line) for line in output.read_text().splitlines()]
  assert [(g.get("line"), g["correct"]) for g in graded] == [
      (None, True),
      (2, False),
      (3, False),
      (4, False),
      (None, True),
  ]
  assert "invalid UTF-8" in graded[2]["reason"] and "'reference'" in graded[3]["reason"]
  err = capsys.readouterr().err.splitlines()
  assert [l.split(":")[2] for l in err] == ["2", "3", "4"]
  assert rewards_cli.main(argv + ["--skip_bad"]) == 0
  assert len(output.read_text().splitlines()) == 2


def test_cli_checks_the_output_directory_before_grading(tmp_path, capsys, monkeypatch):
  samples = tmp_path / "samples.jsonl"
  samples.write_text(json.dumps({"response": "A: 18", "reference": "18"}) + "\n")
  graded = []
  monkeypatch.setattr(rewards_cli, "grade_batch", lambda *a, **k: graded.append(1) or [])
  missing = tmp_path / "no_such_dir" / "graded.jsonl"
  assert rewards_cli.main(["--task", "gsm8k", "--input", str(samples), "--output", str(missing)])
  (line,) = capsys.readouterr().err.splitlines()
  assert "no_such_dir" in line and "create the directory" in line and not graded
