"""Train steps that update a policy and a value model together: DQO and DRO-V (their objectives
are in `dqo_jax.methods`).

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

from dqo_jax import lora
from dqo_jax.model import Transformer, policy_trunk
from dqo_jax.train import accumulate
from dqo_jax.train.forward import response_logprobs, response_values, with_dropout_keys
from dqo_jax.train.state import TrainState, keep_if_finite


@flax.struct.dataclass
class PolicyValueState:
  policy: TrainState
  value: TrainState

  @property
  def step(self):
    return self.policy.step


def masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_policy_value_step(
    policy_model: Transformer,
    value_model: Transformer,
    policy_tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
    objective,
    value_warmup_steps: int = 0,
    grad_accum_steps: int = 1,
    dropout_key=None,
):
  """objective(logp, values, batch, step) -> (policy_loss(logp), value_loss(values), metrics):
  two functions of their own model's outputs, the other model's outputs held fixed. A step with
  a non-finite loss or gradient updates neither model (skipped_updates 1).

  Both models run on `grad_accum_steps` micro-batches (`dqo_jax.train.accumulate`); the
  objective always sees the whole batch. With LoRA the states hold adapters (and the value
  head), and `base`, the frozen SFT policy, serves both models (`dqo_jax.lora`); `dropout_key`
  draws the adapters' dropout masks, different ones for the two models."""
  key = "config.train.grad_accum_steps"

  def step(state: PolicyValueState, batch, base=None):
    value_base = None if base is None else policy_trunk(base)
    logprobs = lambda p, b: response_logprobs(policy_model, lora.merge(base, p), b)
    value_fn = lambda p, b: response_values(value_model, lora.merge(value_base, p), b)
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    policy_rows = with_dropout_keys(batch, keys[0], state.value.step)
    value_rows = with_dropout_keys(batch, keys[1], state.value.step)
    logp, policy_vjp = accumulate.vjp(
        logprobs, state.policy.params, policy_rows, grad_accum_steps, key
    )
    values, value_vjp = accumulate.vjp(
        value_fn, state.value.params, value_rows, grad_accum_steps, key
    )
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
