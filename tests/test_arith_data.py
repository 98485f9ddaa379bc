"""Tests for the arithmetic problem generator and its TFDS packaging."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqo_jax.data import arith
from dqo_jax.data.arith_tfds import load_arith

_STEP_RE = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
_START_RE = re.compile(r"^[A-Z][a-z]+ has (\d+) [a-z]+\.")


def _check_problem(problem, max_operand, max_result):
  """Asserts every invariant of one problem, recomputing each step."""
  *steps, final = problem.solution.split("\n")
  assert len(steps) == problem.num_steps
  assert final == f"#### {problem.answer}"

  value = int(_START_RE.match(problem.question).group(1))
  assert 0 <= value <= max_result
  for line in steps:
    match = _STEP_RE.fullmatch(line)
    assert match, line
    left, op, operand, result = match.groups()
    left, operand, result = int(left), int(operand), int(result)
    assert left == value, "each step starts from the previous result"
    if op == "+":
      assert 1 <= operand <= max_operand and result == left + operand
    elif op == "-":
      assert 1 <= operand <= max_operand and result == left - operand
    elif op == "*":
      assert 2 <= operand <= 5 and result == left * operand
    else:
      assert 2 <= operand <= max_operand
      assert left % operand == 0 and result == left // operand
    assert 0 <= result <= max_result
    value = result
  assert value == problem.answer
  assert problem.question.endswith("have now?")


def test_split_is_deterministic_and_seed_dependent():
  assert arith.generate_split(7, 50) == arith.generate_split(7, 50)
  assert arith.generate_split(7, 50) != arith.generate_split(8, 50)


def test_default_split_invariants():
  problems = arith.generate_split(0, 500)
  for problem in problems:
    _check_problem(problem, max_operand=20, max_result=99)
  assert {p.num_steps for p in problems} == {2, 3, 4, 5}
  assert {op for p in problems for _, op, _, _ in _STEP_RE.findall(p.solution)} == set("+-*/")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    num_steps=st.integers(1, 8),
    max_operand=st.integers(1, 30),
    max_result=st.integers(1, 200),
)
def test_problem_invariants_for_any_parameters(seed, num_steps, max_operand, max_result):
  problem = arith.generate_problem(random.Random(seed), num_steps, max_operand, max_result)
  _check_problem(problem, max_operand, max_result)


def test_vocabulary_is_small():
  words = {
      word for p in arith.generate_split(1, 2000) for word in re.findall(r"[A-Za-z]+", p.question)
  }
  assert len(words) < 80


def test_invalid_arguments():
  with pytest.raises(ValueError):
    arith.generate_problem(random.Random(0), 0)
  with pytest.raises(ValueError):
    arith.generate_split(0, 10, min_steps=4, max_steps=3)


# A tiny problem space, so that train and test collide and dedup is exercised.
_TINY = dict(
    num_train=300, num_test=100, seed=3, min_steps=1, max_steps=1, max_operand=2, max_result=5
)


def test_load_arith_round_trip_dedup_and_reuse(tmp_path, monkeypatch):
  data = load_arith(str(tmp_path), **_TINY)
  assert set(data) == {"train", "test"}
  assert len(data["train"]) == _TINY["num_train"]
  assert 0 < len(data["test"]) < _TINY["num_test"], "tiny space must force some overlap"

  train_questions = {ex["question"] for ex in data["train"]}
  assert not train_questions & {ex["question"] for ex in data["test"]}

  for example in data["train"] + data["test"]:
    assert set(example) == {"question", "solution", "answer", "num_steps"}
    assert isinstance(example["question"], str) and isinstance(example["solution"], str)
    assert type(example["answer"]) is int and type(example["num_steps"]) is int
    problem = arith.Problem(**example)
    _check_problem(problem, _TINY["max_operand"], _TINY["max_result"])

  # Same records as generating directly (TFDS may reorder them).
  expected = arith.generate_split(2 * _TINY["seed"], _TINY["num_train"], 1, 1, 2, 5)
  key = lambda ex: (ex["question"], ex["solution"])  # noqa: E731
  assert sorted(map(key, data["train"])) == sorted((p.question, p.solution) for p in expected)

  # The second call must read the prepared files, not regenerate.
  def fail(*args, **kwargs):
    raise AssertionError("dataset regenerated on second call")

  monkeypatch.setattr(arith, "generate_split", fail)
  assert load_arith(str(tmp_path), **_TINY) == data


def test_different_parameters_get_different_directories(tmp_path):
  load_arith(str(tmp_path), **_TINY)
  load_arith(str(tmp_path), **{**_TINY, "max_result": 6})
  config_dirs = list((tmp_path / "arithmetic_problems").iterdir())
  assert len(config_dirs) == 2
