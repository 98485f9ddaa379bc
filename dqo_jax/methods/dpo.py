"""DPO (Rafailov et al. 2023) on (correct, incorrect) pairs of samples of one prompt."""

from __future__ import annotations

from dqo_jax import bandit_losses
from dqo_jax.data import views
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.policy_step import halves, sequence_logratio


def objective(beta: float):
  """Batch: P chosen responses followed by their P rejected partners ([2P, R])."""

  def loss(logp, batch):
    chosen, rejected = halves(sequence_logratio(logp, batch))
    return bandit_losses.dpo_loss(chosen, rejected, beta=beta)

  return loss


def view(data: TrainData) -> View:
  records, arrays = data.samples
  pairs = views.dpo_pairs(records, data.config.dpo.max_pairs_per_prompt, data.seed)
  return View(
      data.batches(arrays, len(pairs), rows=lambda idx: pairs[idx]),
      len(pairs),
      dict(pairs=len(pairs), prompts=len({records[i]["prompt_index"] for i in pairs[:, 0]})),
  )


def defaults(beta: float) -> dict:
  del beta  # DPO's beta has a scale of its own: the pairwise logistic loss's temperature
  return dict(beta=0.1, max_pairs_per_prompt=4)  # <= 0: every (correct, incorrect) pair


METHOD = Method(
    name="dpo",
    order=2,
    summary="DPO on every (correct, incorrect) pair of a prompt, capped per prompt",
    view=view,
    objective=lambda config, view: objective(float(config.dpo.beta)),
    rows_per_example=2,
    defaults=defaults,
)
