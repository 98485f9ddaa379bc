"""Training state and optimizer: a plain pytree, so Orbax saves it and jit shards it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dqo_jax.errors import UserError


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


OPTIMIZERS = ("adamw", "adafactor")
MOMENT_DTYPES = ("float32", "bfloat16")


def check_optimizer(opt_cfg, key: str) -> None:
  """UserError naming the fix for an optimizer section `key` (e.g. "train.policy_optimizer")
  whose name or moment dtype this version does not build."""
  name, mu_dtype = opt_cfg.get("name", "adamw"), opt_cfg.get("mu_dtype", "float32")
  if name not in OPTIMIZERS:
    raise UserError(f"config.{key}.name={name!r}; choose from {', '.join(OPTIMIZERS)}")
  if mu_dtype not in MOMENT_DTYPES:
    raise UserError(f"config.{key}.mu_dtype={mu_dtype!r}; choose from {', '.join(MOMENT_DTYPES)}")
  if name == "adafactor" and mu_dtype != "float32":
    raise UserError(
        f"config.{key}.mu_dtype applies to adamw only (adafactor keeps no first moment)"
    )


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW or Adafactor with linear warm-up, cosine decay to `end_lr_fraction` and global-norm
  clipping.

  State per float32 parameter: AdamW 8 bytes (6 with its first moment in `mu_dtype="bfloat16"`);
  Adafactor a row and a column mean per matrix (its second moment factored, decaying as
  1 - t^-0.8 in place of `b2`, and no first moment), which lets DQO's two 7B models fit where
  AdamW's moments do not (docs/scaling.md).
  """
  warmup = min(int(opt_cfg.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_cfg.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=opt_cfg.lr * opt_cfg.end_lr_fraction,
  )
  if opt_cfg.get("name", "adamw") == "adamw":
    mu_dtype = opt_cfg.get("mu_dtype", "float32")
    scale = optax.adamw(
        schedule,
        b1=0.9,
        b2=opt_cfg.b2,
        weight_decay=opt_cfg.weight_decay,
        mu_dtype=None if mu_dtype == "float32" else jnp.dtype(mu_dtype),
    )
  else:
    # Not optax.adafactor: its weight decay is not multiplied by the learning rate, and by default
    # it scales the step by each parameter's RMS. Here the step is lr times the update clipped to
    # block RMS 1 (the paper's update clipping), with AdamW's decoupled decay, so that a
    # learning rate means what it means for AdamW.
    scale = optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(opt_cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
  return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), scale)
