"""Gradient accumulation over micro-batches, exact for any objective of the model's outputs.

Every step differentiates a loss of per-token model outputs ([B, R] log-probs or values). With k
micro-batches, `vjp` runs the model on B/k rows at a time twice: a forward pass for the outputs
of the whole batch, then, once the step has the loss's gradient with respect to those outputs,
a forward and backward pass per micro-batch pulling that gradient back to the parameters,
summed. The loss and its normalisers (valid-token counts, KTO's z0, DPO's pairs, logged
statistics) thus see the whole batch, so the gradients equal the full-batch ones. The price is
one extra forward pass per step; the gain is activations for B/k rows instead of B.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dqo_jax.errors import UserError


def check_steps(batch_rows: int, steps: int, where: str) -> None:
  """Raises UserError unless `steps` >= 1 divides `batch_rows`; `where` names the config key."""
  if steps < 1 or batch_rows % steps:
    raise UserError(
        f"{where}={steps} must be at least 1 and divide the batch of {batch_rows} rows; "
        f"set it to a divisor of {batch_rows}"
    )


def _split(tree, k: int):
  """[B, ...] -> [k, B/k, ...]; micro-batch m holds rows m, m + k, m + 2k, ..., so that each
  device's contiguous block of the batch splits into k local pieces (no data moves)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), tree
  )


def _merge(tree):
  """The inverse of `_split`: [k, B/k, ...] -> [B, ...]."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def vjp(fn: Callable[[Any, dict], jax.Array], params, batch: dict, steps: int, where: str):
  """`jax.vjp(lambda p: fn(p, batch), params)`, computed `steps` micro-batches at a time.

  fn(params, batch) -> outputs [B, ...] row-aligned with the batch; returns (outputs, pullback)
  with pullback(d_outputs) -> (grads,). `where` names the config key for the error message.
  """
  if steps == 1:
    return jax.vjp(lambda p: fn(p, batch), params)
  check_steps(jax.tree.leaves(batch)[0].shape[0], steps, where)
  micro = _split(batch, steps)
  outputs = _merge(jax.lax.map(lambda b: fn(params, b), micro))

  def pullback(d_outputs):
    def add_grads(total, xs):
      b, d = xs
      _, pull = jax.vjp(lambda p: fn(p, b), params)
      return jax.tree.map(jnp.add, total, pull(d)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(add_grads, zeros, (micro, _split(d_outputs, steps)))
    return (grads,)

  return outputs, pullback
