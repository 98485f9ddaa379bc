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
  rngs = {}
  if DROPOUT_KEY in batch:  # LoRA's adapter dropout: the (micro-)batch's first row's key
    rngs["dropout"] = jax.random.wrap_key_data(batch[DROPOUT_KEY][0])
  # The last response token predicts nothing, so it is not fed; position p-1+t predicts a_t,
  # and the positions before p-1 need no output.
  out, _ = model.apply(
      {"params": params}, tokens[:, :-1], mask[:, :-1], first_output=p - 1, rngs=rngs, **kwargs
  )
  return out


DROPOUT_KEY = "dropout_key"


def with_dropout_keys(batch, key, step):
  """`batch` with a dropout key per row (`model.lora.dropout`), drawn from `key` folded with the
  train step, so that a resumed run draws the same masks; `key` None: `batch` itself. Keys go
  with the rows so that each micro-batch of gradient accumulation draws its own masks, the same
  in its forward pass and in its recomputation for the gradient."""
  if key is None:
    return batch
  keys = jax.random.split(jax.random.fold_in(key, step), batch["response"].shape[0])
  return dict(batch, **{DROPOUT_KEY: jax.random.key_data(keys)})


def response_logprobs(model: Transformer, params, batch) -> jax.Array:
  """log pi(a_t | s_t) for every response token, [B, R] float32 (padding included); the model's
  `logprob_chunk` bounds the logits held at once."""
  return _response_aligned(model, params, batch, targets=batch["response"])


def response_values(model: Transformer, params, batch) -> jax.Array:
  """V(s_t) for every response token from a value-head model, [B, R] float32."""
  return _response_aligned(model, params, batch)
