"""Majority voting over extracted answers (maj@k), and the paired interval of the comparison."""

import math

import pytest

from dqo_jax.rewards import Grade
from dqo_jax.stages.measure import majority_correct


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


def test_paired_interval_is_the_t_interval_of_the_differences():
  from dqo_jax.compare import paired_interval

  d = [0.01, 0.03, 0.05]  # mean 0.03, sample std 0.02, t(0.975, 2 df) = 4.303
  half = 4.303 * 0.02 / math.sqrt(3)
  assert paired_interval(d) == pytest.approx((0.03, 0.03 - half, 0.03 + half))
  mean, low, high = paired_interval([0.2])
  assert mean == 0.2 and math.isnan(low) and math.isnan(high)
