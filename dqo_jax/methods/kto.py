"""KTO (Ethayarajh et al. 2024): every sample with its label; z0 from mismatched pairs."""

from __future__ import annotations

import numpy as np

from dqo_jax import bandit_losses
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.data import views
from dqo_jax.train.policy_step import halves, sequence_logratio


def objective(beta: float, lambda_d: float, lambda_u: float):
  """Batch: B samples followed by the same B prompts paired with responses of other prompts
  ([2B, R]); the second half only estimates z0 (not back-propagated)."""

  def loss(logp, batch):
    matched, mismatched = halves(sequence_logratio(logp, batch))
    correct, _ = halves(batch["correct"])
    z0 = bandit_losses.kto_z0(mismatched)
    return bandit_losses.kto_loss(
        matched, correct.astype(bool), z0, beta=beta, lambda_d=lambda_d, lambda_u=lambda_u
    )

  return loss


def view(data: TrainData) -> View:
  records, arrays = data.samples
  n = len(records)
  partner = views.mismatched_partners(records)
  mismatched = dict(arrays, response=arrays["response"][partner])
  mismatched["response_len"] = arrays["response_len"][partner]
  mismatched["correct"] = np.zeros_like(arrays["correct"])
  # log pi_ref of the mismatched (prompt, response) pairs, computed once with the SFT policy.
  mismatched["ref_logprobs"] = data.reference_logprobs(
      arrays["prompt"], arrays["prompt_mask"], mismatched["response"], mismatched["response_len"]
  )
  both = {k: np.concatenate([arrays[k], mismatched[k]]) for k in arrays}
  n_d = int(arrays["correct"].sum())
  lambda_d, lambda_u = bandit_losses.kto_lambdas(
      n_d, n - n_d, target_ratio=float(data.config.kto.desirable_ratio)
  )
  return View(
      data.batches(both, n, rows=lambda idx: np.stack([idx, idx + n], 1)),
      n,
      dict(desirable=n_d, undesirable=n - n_d, lambda_d=lambda_d, lambda_u=lambda_u),
  )


def defaults(beta: float) -> dict:
  del beta  # KTO's beta scales its value function's logistic: a scale of its own
  # lambda_U = 1; lambda_D = desirable_ratio * n_U / n_D, kept so lambda_D n_D / n_U in [1, 4/3]
  return dict(beta=0.1, desirable_ratio=1.0)


def _objective(config, view: View | None):
  # Without data (compiling for a slice) the class weights' values do not matter: 1 each.
  weights = view.describe if view else dict(lambda_d=1.0, lambda_u=1.0)
  return objective(float(config.kto.beta), weights["lambda_d"], weights["lambda_u"])


METHOD = Method(
    name="kto",
    order=3,
    summary="KTO on every sample's label, z0 from responses paired with other prompts",
    view=view,
    objective=_objective,
    rows_per_example=2,
    defaults=defaults,
)
