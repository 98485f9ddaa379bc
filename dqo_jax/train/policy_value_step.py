"""Train steps that update a policy and a value model together: DQO and DRO-V.

Each model's forward pass is taken once with `jax.vjp`; the method's targets are computed from
the primal outputs (policy log-probs [B, R] and values [B, R]), and each loss's gradient with
respect to its own model's outputs is pulled back once: no second forward pass. The value loss
therefore reaches only the value parameters and the policy loss only the policy parameters.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dqo_jax import bandit_losses, losses
from dqo_jax.model import Transformer
from dqo_jax.train import accumulate
from dqo_jax.train.forward import response_logprobs, response_mask, response_values
from dqo_jax.train.state import TrainState, keep_if_finite


@flax.struct.dataclass
class PolicyValueState:
  policy: TrainState
  value: TrainState

  @property
  def step(self):
    return self.policy.step


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_policy_value_step(
    policy_model: Transformer,
    value_model: Transformer,
    policy_tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
    objective,
    value_warmup_steps: int = 0,
    grad_accum_steps: int = 1,
):
  """objective(logp, values, batch, step) -> (policy_loss(logp), value_loss(values), metrics):
  two functions of their own model's outputs, the other model's outputs held fixed. A step with
  a non-finite loss or gradient updates neither model (skipped_updates 1).

  Both models run on `grad_accum_steps` micro-batches (`dqo_jax.train.accumulate`); the
  objective always sees the whole batch."""
  logprobs = lambda p, b: response_logprobs(policy_model, p, b)
  value_fn = lambda p, b: response_values(value_model, p, b)
  key = "config.train.grad_accum_steps"

  def step(state: PolicyValueState, batch):
    logp, policy_vjp = accumulate.vjp(logprobs, state.policy.params, batch, grad_accum_steps, key)
    values, value_vjp = accumulate.vjp(value_fn, state.value.params, batch, grad_accum_steps, key)
    policy_loss, value_loss, metrics = objective(logp, values, batch, state.value.step)
    p_loss, d_logp = jax.value_and_grad(policy_loss)(logp)
    v_loss, d_values = jax.value_and_grad(value_loss)(values)
    (policy_grads,) = policy_vjp(d_logp)
    (value_grads,) = value_vjp(d_values)
    norms = dict(
        policy_grad_norm=optax.tree.norm(policy_grads),
        value_grad_norm=optax.tree.norm(value_grads),
    )
    policy = state.policy.apply_gradients(policy_grads, policy_tx)
    if value_warmup_steps:
      # The value model alone learns for the first steps (the policy is still pi_ref), so that
      # bootstrapped targets (lambda < 1) start from a fitted V.
      frozen = state.value.step < value_warmup_steps
      policy = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.policy, policy)
    value = state.value.apply_gradients(value_grads, value_tx)
    new, skipped = keep_if_finite(
        state, PolicyValueState(policy=policy, value=value), p_loss, v_loss, *norms.values()
    )
    return new, dict(
        policy_loss=p_loss, value_loss=v_loss, **norms, **metrics, skipped_updates=skipped
    )

  return step


def dqo_objective(cfg, reward_cfg=None):
  """DQO (docs/method.md): cfg is `config.dqo`; `reward_cfg` (`config.rewards`) is needed only
  for process supervision's value targets."""
  beta, lam, norm = float(cfg.beta), float(cfg.lam), cfg.loss_norm
  ps = cfg.process
  alpha = float(ps.alpha)

  def objective(logp, values, batch, step):
    mask = response_mask(batch).astype(jnp.float32)
    ref = batch["ref_logprobs"]
    rewards = losses.place_outcome_rewards(batch["reward"], batch["response_len"], mask.shape[1])
    if ps.enabled:
      rewards = rewards + losses.potential_shaping(batch["potentials"], mask, alpha=alpha)
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
        impl=cfg.get("return_impl", "scan"),
    )
    policy_loss = lambda lp: losses.dqo_q_loss(
        lp, ref, values, rewards, returns, mask, beta=beta, lam=lam, normalize=norm
    )
    value_loss = lambda v: losses.dqo_value_loss(v, returns, mask, normalize=norm)
    if ps.enabled and ps.value_weight:
      value_loss = _with_process_value_loss(value_loss, batch, ps, reward_cfg, step)

    log_ratio = logp - ref
    advantage = losses.q_targets(rewards, values, returns, mask, lam=lam) - beta * log_ratio
    adv_mean = _masked_mean(advantage, mask)
    metrics = dict(
        mean_value=_masked_mean(values, mask),
        mean_log_ratio=_masked_mean(log_ratio, mask),
        seq_log_ratio=jnp.mean(jnp.sum(log_ratio * mask, axis=1)),
        mean_return=_masked_mean(returns, mask),
        advantage_mean=adv_mean,
        advantage_std=jnp.sqrt(_masked_mean((advantage - adv_mean) ** 2, mask)),
        reward=jnp.mean(batch["reward"]),
    )
    if ps.enabled:
      # V(s_0) beside the rollouts' Monte-Carlo success rate p_0 of pi_ref from the bare prompt:
      # where V stands against what the prompt is worth under pi_ref (under shaping V* is
      # offset by -alpha p_0, and above p_0 by the soft improvement over pi_ref).
      metrics.update(
          prompt_value=jnp.mean(values[:, 0]), prompt_mc_success=jnp.mean(batch["potentials"][:, 0])
      )
    return policy_loss, value_loss, metrics

  return objective


def _with_process_value_loss(value_loss, batch, ps, reward_cfg, step):
  """Adds the warm start of V at step boundaries: (V(s) - (R_c p + R_i (1 - p) - alpha p))^2,
  weighted by `value_weight`, decaying linearly to 0 over `value_decay_steps`."""
  p, at = batch["potentials"], batch["boundary_mask"]
  target = reward_cfg.correct * p + reward_cfg.incorrect * (1.0 - p) - ps.alpha * p
  decay = jnp.maximum(0.0, 1.0 - step / max(int(ps.value_decay_steps), 1))
  weight = float(ps.value_weight) * decay
  return lambda v: value_loss(v) + weight * _masked_mean(jnp.square(v - target), at)


def dro_objective(beta: float):
  """DRO-V (Richemond et al. 2024): V(x) is the value model read at the last prompt token
  (response-aligned index 0); policy and value have separate stop-gradient losses."""

  def objective(logp, values, batch, step):
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

  return objective


def make_dqo_step(
    policy_model, value_model, policy_tx, value_tx, cfg, reward_cfg=None, grad_accum_steps=1
):
  """The DQO step; cfg is `config.dqo`."""
  return make_policy_value_step(
      policy_model,
      value_model,
      policy_tx,
      value_tx,
      dqo_objective(cfg, reward_cfg),
      int(cfg.value_warmup_steps),
      grad_accum_steps,
  )
