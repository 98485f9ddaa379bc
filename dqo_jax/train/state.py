"""Training state and optimizer: a plain pytree, so Orbax saves it and jit shards it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def apply_gradients(self, grads, tx: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(
        step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
    )


def keep_if_finite(old, new, *checks):
  """(`new` if every scalar in `checks` is finite, else `old`; skipped: 1.0 or 0.0 float32).

  Pass the losses and the gradients' global norms: a norm is finite exactly when every gradient
  is (and an overflowing one would turn clipping into NaN anyway). One choice for the whole
  state, so a step with two optimizers never moves one model without the other, and a skipped
  step leaves step counters, schedules and optimizer moments as they were.
  """
  finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(c, jnp.float32) for c in checks])))
  kept = jax.tree.map(lambda o, n: jnp.where(finite, n, o), old, new)
  return kept, 1.0 - finite.astype(jnp.float32)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay to `end_lr_fraction` and global-norm clipping."""
  warmup = min(int(opt_cfg.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_cfg.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=opt_cfg.lr * opt_cfg.end_lr_fraction,
  )
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay),
  )
