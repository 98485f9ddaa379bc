"""RFT (rejection-sampling fine-tuning, Yuan et al. 2023): SFT on the gold solutions plus the
model's own verified-correct samples, deduplicated per prompt by their equations."""

from __future__ import annotations

from dqo_jax import tasks
from dqo_jax.data import views
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.policy_step import nll_objective


def view(data: TrainData) -> View:
  records, arrays = data.samples
  equations = tasks.get(data.config.data.task).equations
  rft = views.rft_arrays(records, arrays, data.gold, data.known, equations)
  size = len(rft["response_len"])
  return View(
      data.batches(rft, size), size, dict(gold=len(data.gold), kept_samples=size - len(data.gold))
  )


METHOD = Method(
    name="rft",
    order=1,
    summary="SFT on the gold solutions and the correct samples, deduplicated",
    view=view,
    objective=lambda config, view: nll_objective,
)
