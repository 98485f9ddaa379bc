"""Continued SFT: the SFT objective on the same gold solutions, for the RL methods' budget.

The control for every RL method: what training longer on the supervised data alone gives.
"""

from __future__ import annotations

from dqo_jax.data.views import TOKEN_KEYS
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.policy_step import nll_objective


def view(data: TrainData) -> View:
  arrays = {k: data.gold.arrays[k] for k in TOKEN_KEYS}
  return View(data.batches(arrays, len(data.gold)), len(data.gold), {})


METHOD = Method(
    name="sft",
    order=0,
    summary="continued SFT on the gold solutions (negative log-likelihood)",
    view=view,
    objective=lambda config, view: nll_objective,
    reads_samples=False,
    runs=("sft_continued",),
)
