"""KV-cache sampling: one jitted prefill, then a `lax.while_loop` decode with no host round trip.

Prompts come left-padded ([B, P]); responses come back right-padded ([B, R]) with their lengths,
finish reasons and the log-probabilities of the distribution actually sampled from (after
temperature), which DQO stores as the behaviour policy mu.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dqo_jax.model import Transformer, init_cache

FINISH_EOS, FINISH_LENGTH = 0, 1


class Samples(NamedTuple):
  tokens: jax.Array  # [B, R] int32, pad after the end
  logprobs: jax.Array  # [B, R] float32, behaviour log-probs, 0 after the end
  lengths: jax.Array  # [B] int32, response tokens including EOS
  finish: jax.Array  # [B] int32, FINISH_EOS or FINISH_LENGTH


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id", "greedy")
)
def generate(
    model: Transformer,
    params,
    prompt,
    prompt_mask,
    rng,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Samples:
  """Samples up to `max_new_tokens` per prompt; stops early once every row has emitted EOS."""
  b, p = prompt.shape
  cache = init_cache(model.cfg, b, p + max_new_tokens)
  logits, cache = model.apply({"params": params}, prompt, prompt_mask, cache=cache, cache_index=0)
  # Left padding puts every prompt's last real token in the last column.
  last = logits[:, -1]

  def cond(state):
    i, _, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, last, toks, lps, done, rng = state
    rng, key = jax.random.split(rng)
    scaled = last / jnp.where(greedy, 1.0, temperature)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    tok = jnp.argmax(last, -1) if greedy else jax.random.categorical(key, scaled, axis=-1)
    tok = tok.astype(jnp.int32)
    lp = jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    toks = toks.at[:, i].set(tok)
    lps = lps.at[:, i].set(lp)
    new_done = done | (tok == eos_id)
    logits, cache = model.apply(
        {"params": params},
        tok[:, None],
        (~done)[:, None].astype(jnp.int32),
        cache=cache,
        cache_index=p + i,
    )
    return i + 1, cache, logits[:, 0], toks, lps, new_done, rng

  state = (
      jnp.int32(0),
      cache,
      last,
      jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((b, max_new_tokens), jnp.float32),
      jnp.zeros((b,), bool),
      rng,
  )
  _, _, _, toks, lps, done, _ = jax.lax.while_loop(cond, body, state)
  is_eos = toks == eos_id
  first_eos = jnp.argmax(is_eos, axis=-1)
  lengths = jnp.where(done, first_eos + 1, max_new_tokens).astype(jnp.int32)
  finish = jnp.where(done, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32)
  return Samples(toks, lps, lengths, finish)
