"""Majority voting over extracted answers (maj@k)."""

from dqo_jax.rewards import Grade
from dqo_jax.stages.monitor import majority_correct


def _g(predicted, correct=False):
  return Grade(correct=correct, predicted=predicted, reason="")


def test_the_most_frequent_answer_wins():
  assert majority_correct([_g("3"), _g("7", True), _g("7", True), _g("3")] + [_g("7", True)])
  assert not majority_correct([_g("3"), _g("3"), _g("7", True)])


def test_ties_go_to_the_earliest_answer():
  assert majority_correct([_g("7", True), _g("3"), _g("3"), _g("7", True)])
  assert not majority_correct([_g("3"), _g("7", True), _g("7", True), _g("3")])


def test_answerless_samples_cast_no_vote():
  assert majority_correct([_g(None), _g(None), _g("7", True)])
  assert not majority_correct([_g(None), _g(None)])
