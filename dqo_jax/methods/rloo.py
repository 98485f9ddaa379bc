"""RLOO (Ahmadian et al. 2024), offline: REINFORCE on the K samples of each prompt, each sample's
KL-regularised reward baselined by the mean of the other K - 1 (leave one out), at the sequence
level, with the beta of DQO and DRO (docs/method.md, "The baselines").

The samples are pi_ref's, not the current policy's, and no importance weight corrects for that.
The stationary point is still the KL-regularised optimum: with a softmax over responses and the
baseline b = E_{pi_ref}[R - beta l], the expected gradient's component for response y is
pi_ref(y) (R(y) - beta l(y) - b) - pi(y) E_{pi_ref}[R - beta l - b], zero exactly when
R(y) - beta l(y) is the same for every y, i.e. pi(y) ∝ pi_ref(y) exp(R(y) / beta).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dqo_jax.errors import UserError
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.policy_step import sequence_logratio


def rloo_loss(logratio, reward, *, beta: float, group_size: int):
  """The leave-one-out REINFORCE surrogate; its gradient is the estimator, not its value.

    r_i = R_i - beta sg(l_i);   A_i = r_i - 1/(K-1) sum_{j != i} r_j
    L = -mean_i sg(A_i) l_i,    grad L = -mean_i A_i grad log pi(y_i)

  Args:
    logratio: [K * G] l(y) = log pi(y|x) - log pi_ref(y|x) (differentiated), K samples of each of
      G prompts laid out sample-major: row k * G + g is sample k of prompt g.
    reward: [K * G] R(x, y).
    beta: KL coefficient.
    group_size: K >= 2, the samples per prompt.

  Returns:
    (loss, advantages [K * G]).
  """
  chex.assert_rank([logratio, reward], 1)
  chex.assert_equal_shape([logratio, reward])
  k = group_size
  if k < 2 or logratio.shape[0] % k:
    raise ValueError(f"{logratio.shape[0]} samples do not make groups of {k} >= 2")
  dtype = jnp.promote_types(logratio.dtype, jnp.float32)
  shaped = (reward.astype(dtype) - beta * jax.lax.stop_gradient(logratio.astype(dtype))).reshape(
      k, -1
  )
  advantage = (shaped - (shaped.sum(0, keepdims=True) - shaped) / (k - 1)).reshape(-1)
  loss = -jnp.mean(jax.lax.stop_gradient(advantage) * logratio.astype(dtype))
  return loss, advantage


def objective(beta: float, group_size: int):
  """Batch: K samples of each of G prompts, sample-major ([K * G, R])."""

  def loss(logp, batch):
    logratio = sequence_logratio(logp, batch)
    value, advantage = rloo_loss(logratio, batch["reward"], beta=beta, group_size=group_size)
    return value, dict(
        reward=jnp.mean(batch["reward"]),
        seq_log_ratio=jnp.mean(logratio),
        advantage_std=jnp.std(advantage),
    )

  return loss


def view(data: TrainData) -> View:
  records, arrays = data.samples
  k = int(data.config.sample.samples_per_prompt)
  prompt_index = np.array([r["prompt_index"] for r in records], np.int64)
  if (np.unique(prompt_index, return_counts=True)[1] != k).any():
    raise UserError(
        f"RLOO needs the sample stage's {k} samples of every prompt (sample.samples_per_prompt); "
        "the samples on disk were made with another number: run it again with --redo=sample"
    )
  groups = np.argsort(prompt_index, kind="stable").reshape(-1, k)  # [prompts, K] record indices
  return View(
      data.batches(
          arrays, len(groups), data.config.train.batch_size // k, rows=lambda i: groups[i]
      ),
      len(records),
      dict(prompts=len(groups), samples_per_prompt=k),
  )


def check(config) -> None:
  k, b = config.sample.samples_per_prompt, config.train.batch_size
  if k < 2:
    raise UserError(
        f"RLOO's baseline needs at least 2 samples per prompt: sample.samples_per_prompt is {k}"
    )
  if b % k:
    raise UserError(
        f"config.train.batch_size={b} must hold whole prompts of sample.samples_per_prompt={k} "
        f"samples for RLOO; use a multiple of {k}"
    )


METHOD = Method(
    name="rloo",
    order=4,
    summary="offline REINFORCE, leave-one-out baseline over a prompt's K samples, KL-regularised",
    view=view,
    objective=lambda config, view: objective(
        float(config.rloo.beta), int(config.sample.samples_per_prompt)
    ),
    # DQO's beta: the same KL-regularised objective, at the sequence level.
    defaults=lambda beta: dict(beta=beta),
    check=check,
)
