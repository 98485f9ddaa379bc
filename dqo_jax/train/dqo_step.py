"""The DQO train step: both models updated every step from one forward and backward each.

The policy is the Q-function (Q = beta * l_t + V(s_t), l_t = log pi - log pi_ref); the value model
is a separate network. Targets are soft lambda-returns (`dqo_jax.losses`). Each model's forward
pass is taken with `jax.vjp`, the targets are computed from the primal outputs, and each loss's
gradient with respect to the per-token outputs is pulled back once: no second forward pass.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dqo_jax import losses
from dqo_jax.model import Transformer
from dqo_jax.train.forward import response_logprobs, response_mask, response_values
from dqo_jax.train.state import TrainState


@flax.struct.dataclass
class DQOState:
  policy: TrainState
  value: TrainState

  @property
  def step(self):
    return self.policy.step


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_dqo_step(
    policy_model: Transformer,
    value_model: Transformer,
    policy_tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
    cfg,
):
  """cfg: `config.dqo` (beta, lam, importance_traces, rho_max, c_max, loss_norm,
  value_warmup_steps)."""
  beta, lam, norm = float(cfg.beta), float(cfg.lam), cfg.loss_norm
  warmup = int(cfg.value_warmup_steps)

  def step(state: DQOState, batch):
    mask = response_mask(batch).astype(jnp.float32)
    ref = batch["ref_logprobs"]
    rewards = losses.place_outcome_rewards(batch["reward"], batch["response_len"], mask.shape[1])
    logp, policy_vjp = jax.vjp(
        lambda p: response_logprobs(policy_model, p, batch), state.policy.params
    )
    values, value_vjp = jax.vjp(
        lambda p: response_values(value_model, p, batch), state.value.params
    )
    returns = losses.soft_lambda_returns(
        rewards,
        values,
        logp,
        ref,
        mask,
        beta=beta,
        lam=lam,
        behaviour_logprobs=batch["behaviour_logprobs"] if cfg.importance_traces else None,
        rho_max=float(cfg.rho_max),
        c_max=float(cfg.c_max),
    )
    q_loss, d_logp = jax.value_and_grad(
        lambda lp: losses.dqo_q_loss(
            lp, ref, values, rewards, returns, mask, beta=beta, lam=lam, normalize=norm
        )
    )(logp)
    v_loss, d_values = jax.value_and_grad(
        lambda v: losses.dqo_value_loss(v, returns, mask, normalize=norm)
    )(values)
    (policy_grads,) = policy_vjp(d_logp)
    (value_grads,) = value_vjp(d_values)

    log_ratio = logp - ref
    advantage = losses.q_targets(rewards, values, returns, mask, lam=lam) - beta * log_ratio
    adv_mean = _masked_mean(advantage, mask)
    metrics = dict(
        q_loss=q_loss,
        value_loss=v_loss,
        mean_value=_masked_mean(values, mask),
        mean_log_ratio=_masked_mean(log_ratio, mask),
        seq_log_ratio=jnp.mean(jnp.sum(log_ratio * mask, axis=1)),
        mean_return=_masked_mean(returns, mask),
        advantage_mean=adv_mean,
        advantage_std=jnp.sqrt(_masked_mean((advantage - adv_mean) ** 2, mask)),
        reward=jnp.mean(batch["reward"]),
        policy_grad_norm=optax.tree.norm(policy_grads),
        value_grad_norm=optax.tree.norm(value_grads),
    )
    policy = state.policy.apply_gradients(policy_grads, policy_tx)
    if warmup:
      # The value model alone learns for the first `warmup` steps (the policy is still pi_ref),
      # so that bootstrapped targets (lambda < 1) start from a fitted V.
      frozen = state.value.step < warmup
      policy = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.policy, policy)
    new_state = DQOState(policy=policy, value=state.value.apply_gradients(value_grads, value_tx))
    return new_state, metrics

  return step
