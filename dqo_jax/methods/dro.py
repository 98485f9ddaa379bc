"""DRO-V (Richemond et al. 2024): the KL-regularised objective at the sequence level, with a
value model V(x) of the prompt alone."""

from __future__ import annotations

import jax.numpy as jnp

from dqo_jax import bandit_losses
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.forward import response_mask


def objective(beta: float):
  """V(x) is the value model read at the last prompt token (response-aligned index 0); policy
  and value have separate stop-gradient losses."""

  def losses(logp, values, batch, step):
    del step
    logratio = bandit_losses.sequence_logratio(logp, batch["ref_logprobs"], response_mask(batch))
    reward = batch["reward"]
    policy_loss = lambda lp: bandit_losses.dro_policy_loss(
        bandit_losses.sequence_logratio(lp, batch["ref_logprobs"], response_mask(batch)),
        reward,
        values[:, 0],
        beta=beta,
    )
    value_loss = lambda v: bandit_losses.dro_value_loss(logratio, reward, v[:, 0], beta=beta)
    metrics = dict(
        seq_log_ratio=jnp.mean(logratio),
        prompt_value=jnp.mean(values[:, 0]),
        advantage_mean=jnp.mean(reward - values[:, 0] - beta * logratio),
        reward=jnp.mean(reward),
    )
    return policy_loss, value_loss, metrics

  return losses


def view(data: TrainData) -> View:
  records, arrays = data.samples
  return View(data.batches(arrays, len(records)), len(records), {})


METHOD = Method(
    name="dro",
    order=5,
    summary="DRO-V: sequence-level KL-regularised regression with a prompt value V(x)",
    view=view,
    objective=lambda config, view: objective(float(config.dro.beta)),
    trains_value=True,
    # DQO's beta: the same KL-regularised objective, at the sequence level.
    defaults=lambda beta: dict(beta=beta),
)
