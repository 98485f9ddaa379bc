"""Forward passes over a batch laid out [left-padded prompt | right-padded response].

A batch is a dict with `prompt` [B, P] and `prompt_mask` [B, P] (left padded), `response`
[B, R] and `response_len` [B] (right padded). Outputs are response-aligned [B, R]: entry t belongs
to response token a_t and is read at the position whose logits predict a_t, so that
V(s_t) never sees a_t (docs/method.md, "Index conventions").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dqo_jax.losses import mask_from_lengths
from dqo_jax.model import Transformer


def response_mask(batch) -> jax.Array:
  return mask_from_lengths(batch["response_len"], batch["response"].shape[1])


def _response_aligned(model: Transformer, params, batch, **kwargs) -> jax.Array:
  prompt, response = batch["prompt"], batch["response"]
  p = prompt.shape[1]
  tokens = jnp.concatenate([prompt, response], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], response_mask(batch)], axis=1).astype(jnp.int32)
  # The last response token predicts nothing, so it is not fed; position p-1+t predicts a_t,
  # and the positions before p-1 need no output.
  out, _ = model.apply(
      {"params": params}, tokens[:, :-1], mask[:, :-1], first_output=p - 1, **kwargs
  )
  return out


def response_logprobs(model: Transformer, params, batch) -> jax.Array:
  """log pi(a_t | s_t) for every response token, [B, R] float32 (padding included); the model's
  `logprob_chunk` bounds the logits held at once."""
  return _response_aligned(model, params, batch, targets=batch["response"])


def response_values(model: Transformer, params, batch) -> jax.Array:
  """V(s_t) for every response token from a value-head model, [B, R] float32."""
  return _response_aligned(model, params, batch)
