"""The data views each method trains on, and the potentials of process supervision."""

import numpy as np
import pytest

from dqo_jax import tasks
from dqo_jax.data import views
from dqo_jax.data.batches import Encoded
from dqo_jax.errors import UserError
from dqo_jax.stages.rollouts import step_boundaries


def _rec(prompt_index, text, correct, finish="eos"):
  return dict(prompt_index=prompt_index, text=text, correct=correct, finish=finish)


def test_equations_ignore_whitespace_and_prose_and_use_gsm8k_annotations():
  gsm8k = tasks.get("gsm8k").equations
  for task in ("arith", "gsm8k", "math"):
    assert tasks.get(task).equations("3+4=7\n7*2 = 14\n#### 14") == ("3+4=7", "7*2=14")
    assert tasks.get(task).equations("no equations\n#### 3") == ()
  assert gsm8k("She has <<3+4=7>>7 apples, then <<7*2=14>>14.\n#### 14") == ("3+4=7", "7*2=14")


def test_rft_keeps_correct_samples_with_new_equations_once_per_prompt():
  gold = Encoded({}, [dict(solution="1+1=2\n#### 2"), dict(solution="2+2=4\n#### 4")], 0)
  records = [
      _rec(0, "1+1=2\n#### 2", True),  # the gold solution again
      _rec(0, "1 + 1=2\n#### 2", True),  # the same equations, other spacing
      _rec(0, "2-0=2\n#### 2", True),  # new: kept
      _rec(0, "2-0=2\n####  2", True),  # duplicate of the kept one
      _rec(0, "5-3=2\n#### 2", False),  # incorrect
      _rec(0, "9-7=2\n#### 2", True, finish="length"),  # cut off: not a success
      _rec(1, "2-0=2\n#### 2", True),  # same text, other prompt: kept
  ]
  assert views.rft_selection(records, gold, tasks.get("gsm8k").equations) == [2, 6]
  # Answers only (data.num_gold): no gold solution to compare with, so the first correct
  # sample of prompt 0 is new too.
  assert views.rft_selection(records, None, tasks.get("gsm8k").equations) == [0, 2, 6]


def test_dpo_pairs_every_correct_with_every_incorrect_then_caps_per_prompt():
  records = [_rec(0, "", c) for c in (True, True, False, False, False)]
  records += [_rec(1, "", True), _rec(1, "", True)]  # no incorrect sample: no pairs
  records += [_rec(2, "", False), _rec(2, "", True)]
  pairs = views.dpo_pairs(records, max_pairs_per_prompt=0, seed=0)
  expected = {(g, b) for g in (0, 1) for b in (2, 3, 4)} | {(8, 7)}
  assert set(map(tuple, pairs.tolist())) == expected and len(pairs) == 7
  capped = views.dpo_pairs(records, max_pairs_per_prompt=4, seed=0)
  assert len(capped) == 5 and set(map(tuple, capped.tolist())) <= expected
  assert np.array_equal(capped, views.dpo_pairs(records, max_pairs_per_prompt=4, seed=0))
  with pytest.raises(UserError, match="no prompt has both"):
    views.dpo_pairs(records[5:7], max_pairs_per_prompt=4, seed=0)


@pytest.mark.parametrize("group_sizes", [(4, 4, 4), (1, 3, 2, 5), (2, 1)])
def test_kto_partners_always_come_from_another_prompt(group_sizes):
  prompts = [p for p, n in enumerate(group_sizes) for _ in range(n)]
  order = np.random.default_rng(0).permutation(len(prompts))
  records = [_rec(prompts[i], "", True) for i in order]
  partner = views.mismatched_partners(records)
  assert all(
      records[i]["prompt_index"] != records[j]["prompt_index"] for i, j in enumerate(partner)
  )
  with pytest.raises(UserError):
    views.mismatched_partners([_rec(0, "", True)] * 3)


def test_boundary_potentials_follow_the_definition():
  # Response of 8 tokens with delimiters at 2 and 5: Phi(s_t) = p0 for t <= 2, p1 for 2 < t <= 5,
  # p2 after, and 0 at and past the terminal state.
  phi = views.boundary_potentials([2, 5], [0.1, 0.5, 0.9], length=8, width=10)
  np.testing.assert_allclose(phi, [0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.9, 0.9, 0.0, 0.0])
  arrays = views.process_arrays(
      [dict(boundaries=[2, 5], potentials=[0.1, 0.5, 0.9])], np.array([8]), 10
  )
  np.testing.assert_array_equal(np.flatnonzero(arrays["boundary_mask"][0]), [0, 3, 6])


def test_step_boundaries_skip_the_last_token():
  newline = lambda t: t == 4
  assert step_boundaries([7, 4, 9, 4, 3], newline) == [1, 3]
  assert step_boundaries([7, 9, 4], newline) == []


def test_gold_subset_and_answers_only_prompts_split_train_without_overlap():
  import ml_collections

  from dqo_jax.stages.context import Context

  examples = [dict(question=f"q{i}", solution=f"{i}") for i in range(5)]
  train = Encoded({"prompt": np.arange(5)[:, None]}, examples, 0)

  def context(num_gold):
    config = ml_collections.ConfigDict(dict(data=dict(num_gold=num_gold)))
    return Context(config, "", None, train, None, None)

  ctx = context(2)
  assert [e["question"] for e in ctx.gold.examples] == ["q0", "q1"]
  assert [e["question"] for e in ctx.rl_prompts.examples] == ["q2", "q3", "q4"]
  assert ctx.rl_prompts.arrays["prompt"][:, 0].tolist() == [2, 3, 4] and ctx.answers_only
  assert ctx.split("train") is ctx.rl_prompts  # what the objective's "train prompts" are
  everything = context(-1)
  assert everything.gold.examples == examples and everything.rl_prompts is train
  assert not everything.answers_only
