"""KV-cache sampling: one jitted prefill, then a `lax.while_loop` decode with no host round trip.

Prompts come left-padded ([B, P]); responses come back right-padded ([B, R]) with their lengths,
finish reasons and the log-probabilities of the distribution actually sampled from (after
temperature), which DQO stores as the behaviour policy mu.

A row ends at EOS or any other of the tokenizer's `stop_ids` (a chat model's end of turn and its
end of text), at any of the token-level `stop_sequences` (its generated suffix equals one), or
at `max_new_tokens`; the loop exits as soon as every row has ended. The KV cache is allocated
inside the program, so XLA updates it in place across the loop (no copy per step), and with a
`mesh` the batch, the cache and every per-row buffer are split over the mesh's data axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dqo_jax.model import Transformer, init_cache, unstack_layers
from dqo_jax.sharding import BATCH

FINISH_EOS, FINISH_LENGTH, FINISH_STOP = 0, 1, 2


class Samples(NamedTuple):
  tokens: jax.Array  # [B, R] int32, pad after the end
  logprobs: jax.Array  # [B, R] float32, behaviour log-probs, 0 after the end
  lengths: jax.Array  # [B] int32, response tokens including EOS or the stop sequence
  finish: jax.Array  # [B] int32, FINISH_EOS, FINISH_STOP or FINISH_LENGTH


def _stop_table(stop_sequences: tuple[tuple[int, ...], ...]):
  """Right-aligned stop sequences [N, W] and which of their slots are used [N, W] (numpy)."""
  width = max(len(s) for s in stop_sequences)
  table = np.zeros((len(stop_sequences), width), np.int32)
  used = np.zeros((len(stop_sequences), width), bool)
  for i, s in enumerate(stop_sequences):
    if not s:
      raise ValueError("stop_sequences: an empty sequence would stop every row at once")
    table[i, width - len(s) :] = s
    used[i, width - len(s) :] = True
  return table, used


def _argmax(x):
  """First index of the last axis's maximum, from two plain reductions.

  XLA:CPU runs jnp.argmax's variadic (value, index) reduce unvectorised: in the decode profile
  it took 2.5 of the 4.5 ms of a step at batch 32, vocabulary 256.
  """
  n = x.shape[-1]
  first = jnp.where(x == jnp.max(x, -1, keepdims=True), jnp.arange(n, dtype=jnp.int32), n)
  return jnp.minimum(jnp.min(first, -1), n - 1)  # n - 1 only for an all-NaN row


def _choose(last, key, greedy: bool, temperature):
  """The next token of every row from its logits [B, V], and its log-probability under the
  distribution sampled from (after temperature)."""
  scaled = last if greedy else last / temperature
  # jax.random.categorical's own Gumbel-max, with the faster argmax: the same samples.
  noisy = scaled if greedy else scaled + jax.random.gumbel(key, scaled.shape, scaled.dtype)
  tok = _argmax(noisy)
  # log_softmax at one index: a gather minus a logsumexp, not a [B, V] log_softmax.
  lp = jnp.take_along_axis(scaled, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(scaled, -1)
  return tok, lp


def _end_test(eos_id: int, stop_ids, stop_sequences):
  """(tok [B], recent [B, W]) -> (finish reason or -1 [B], recent with tok), and W: the last W
  generated tokens (-1 before the first) are matched against every stop sequence at once."""
  stops = sorted({eos_id, *stop_ids})
  if stop_sequences:
    table, used = _stop_table(stop_sequences)
  width = table.shape[1] if stop_sequences else 1  # an unused slot keeps one state layout

  def test(tok, recent):
    end = jnp.where(functools.reduce(jnp.logical_or, [tok == i for i in stops]), FINISH_EOS, -1)
    if stop_sequences:
      recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
      hit = jnp.all((recent[:, None, :] == table[None]) | ~used[None], axis=-1).any(-1)
      end = jnp.where((end < 0) & hit, FINISH_STOP, end)
    return end, recent

  return test, width


def _per_layer(model: Transformer, params):
  """With scanned layers (`model.scan_layers`), the model and parameters laid out per layer,
  unstacked once before a decode loop: reading each layer out of the stack inside the loop
  copied it at every step (decoding 1.35x slower, measured on CPU)."""
  if not model.cfg.scan_layers:
    return model, params
  return model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False)), unstack_layers(params)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "eos_id",
        "stop_ids",
        "pad_id",
        "greedy",
        "stop_sequences",
        "mesh",
        "samples_per_prompt",
    ),
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
    stop_ids: tuple[int, ...] = (),
    temperature: float = 1.0,
    greedy: bool = False,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
    mesh=None,
    samples_per_prompt: int = 1,
) -> Samples:
  """Samples up to `max_new_tokens` per prompt; stops early once every row has ended.

  `samples_per_prompt` = K: each of the B prompts is prefilled once and its cache copied to K
  rows, which decode independently; the result has B * K rows, prompt-major (row i * K + j is
  sample j of prompt i), each distributed as if its prompt had been prefilled on its own.

  `stop_ids`: ids that end a row as `eos_id` does (FINISH_EOS), e.g. `Tokenizer.stop_ids`.
  `stop_sequences` is a tuple of token-id tuples (static: one compiled program per set). With
  `mesh`, rows are split over its ("data", "fsdp") axes; the batch must divide by their size.
  """
  b, p = prompt.shape
  model, params = _per_layer(model, params)

  def by_row(x):
    if mesh is None:
      return x
    spec = P(BATCH, *(None,) * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  prompt, prompt_mask = by_row(prompt), by_row(prompt_mask)
  cache = jax.tree.map(by_row, init_cache(model.cfg, b, p + max_new_tokens))
  # Left padding puts every prompt's last real token in the last column: its logits are the only
  # ones needed ([B, 1, V], not [B, P, V]).
  logits, cache = model.apply(
      {"params": params}, prompt, prompt_mask, cache=cache, cache_index=0, first_output=p - 1
  )
  last = logits[:, -1]
  if samples_per_prompt > 1:
    b *= samples_per_prompt
    copies = lambda x: by_row(jnp.repeat(x, samples_per_prompt, axis=0))
    cache, last = jax.tree.map(copies, (cache, last))
  ender, width = _end_test(eos_id, stop_ids, stop_sequences)

  def cond(state):
    i, done = state[0], state[5]
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, last, toks, lps, done, ends, recent, rng = state
    rng, key = jax.random.split(rng)
    tok, lp = _choose(last, key, greedy, temperature)
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    # dynamic_update_slice, written in place in the loop (`.at[:, i].set` emits a scatter and
    # leaves it to XLA to turn it into this).
    toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
    lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
    end, recent = ender(tok, recent)
    new_done = done | (end >= 0)
    ends = jnp.where(
        (new_done & ~done)[:, None], jnp.stack([end, jnp.full_like(end, i + 1)], -1), ends
    )
    logits, cache = model.apply(
        {"params": params},
        tok[:, None],
        (~done)[:, None].astype(jnp.int32),
        cache=cache,
        cache_index=p + i,
    )
    return i + 1, cache, logits[:, 0], toks, lps, new_done, ends, recent, rng

  state = (
      jnp.int32(0),
      cache,
      last,
      by_row(jnp.full((b, max_new_tokens), pad_id, jnp.int32)),
      by_row(jnp.zeros((b, max_new_tokens), jnp.float32)),
      by_row(jnp.zeros((b,), bool)),
      # Per row: (finish reason, length), (FINISH_LENGTH, max_new_tokens) until it ends.
      by_row(jnp.tile(jnp.int32([FINISH_LENGTH, max_new_tokens]), (b, 1))),
      by_row(jnp.full((b, width), -1, jnp.int32)),
      rng,
  )
  _, _, _, toks, lps, _, ends, _, _ = jax.lax.while_loop(cond, body, state)
  return Samples(toks, lps, ends[:, 1], ends[:, 0])


# Refilled decode slots (continuous batching): a fixed batch of B rows, each serving one
# request (a prompt's sample) at a time. `decode_slots` decodes every live row until enough
# rows have ended; `refill_slots` prefills C waiting prompts into ended rows; the host
# (`generation.generate_all` with refill) collects ended rows between the two. Each row writes
# its cache at its own step (`model.write_slots` with [B] indices), so a refilled row starts
# over at slot P without disturbing the others, and no row waits for the batch's longest.


class Slots(NamedTuple):
  cache: dict  # model.init_cache(B, P + R)
  last: jax.Array  # [B, V] logits of each row's next token
  toks: jax.Array  # [B, R] int32, the row's current request's tokens (pad after its end)
  lps: jax.Array  # [B, R] float32 behaviour log-probs
  step: jax.Array  # [B] int32, tokens generated for the row's current request
  done: jax.Array  # [B] bool: the request has ended (or the row never held one)
  ends: jax.Array  # [B, 2] int32: (finish reason, length)
  recent: jax.Array  # [B, W] int32: the stop-sequence window
  rng: jax.Array


def empty_slots(model: Transformer, rows: int, prompt_len: int, max_new_tokens: int, rng, width):
  """B rows holding no request (all done), for `refill_slots` to fill."""
  return Slots(
      cache=init_cache(model.cfg, rows, prompt_len + max_new_tokens),
      last=jnp.zeros((rows, model.cfg.vocab_size), jnp.float32),
      toks=jnp.zeros((rows, max_new_tokens), jnp.int32),
      lps=jnp.zeros((rows, max_new_tokens), jnp.float32),
      step=jnp.zeros((rows,), jnp.int32),
      done=jnp.ones((rows,), bool),
      ends=jnp.tile(jnp.int32([FINISH_LENGTH, max_new_tokens]), (rows, 1)),
      recent=jnp.full((rows, width), -1, jnp.int32),
      rng=rng,
  )


@functools.partial(
    jax.jit, static_argnames=("model", "samples_per_prompt", "pad_id"), donate_argnames=("slots",)
)
def refill_slots(
    model: Transformer,
    params,
    slots: Slots,
    prompt,
    prompt_mask,
    rows,
    *,
    pad_id: int,
    samples_per_prompt: int = 1,
) -> Slots:
  """Prefills prompts [C / K, P] once each and starts K rows of each: `rows` [C] (prompt-major;
  an index of B or more drops that copy), from an empty cache at slot 0."""
  n, p = prompt.shape
  k = samples_per_prompt
  logits, fresh = model.apply(
      {"params": params},
      prompt,
      prompt_mask,
      cache=init_cache(model.cfg, n, p),
      cache_index=0,
      first_output=p - 1,
  )
  rep = lambda x: jnp.repeat(x, k, axis=0)
  put = lambda buf, new: buf.at[rows].set(new.astype(buf.dtype), mode="drop")
  # The prompt's keys at slots [0, P); the row's later slots keep the previous request's values,
  # masked out by key_mask until this request overwrites them.
  put_kv = lambda buf, new: buf.at[rows, :, :p].set(rep(new).astype(buf.dtype), mode="drop")
  width = slots.cache["key_mask"].shape[1]
  key_mask = jnp.pad(rep(prompt_mask.astype(bool)), ((0, 0), (0, width - p)))
  cache = dict(
      k=tuple(map(put_kv, slots.cache["k"], fresh["k"])),
      v=tuple(map(put_kv, slots.cache["v"], fresh["v"])),
      key_mask=put(slots.cache["key_mask"], key_mask),
      next_position=put(slots.cache["next_position"], rep(fresh["next_position"])),
  )
  c = rows.shape[0]
  return slots._replace(
      cache=cache,
      last=put(slots.last, rep(logits[:, -1])),
      toks=put(slots.toks, jnp.full((c, slots.toks.shape[1]), pad_id)),
      lps=put(slots.lps, jnp.zeros((c, slots.lps.shape[1]))),
      step=put(slots.step, jnp.zeros((c,), jnp.int32)),
      done=put(slots.done, jnp.zeros((c,), bool)),
      ends=put(slots.ends, jnp.tile(jnp.int32([FINISH_LENGTH, slots.toks.shape[1]]), (c, 1))),
      recent=put(slots.recent, jnp.full((c, slots.recent.shape[1]), -1)),
  )


@functools.partial(
    jax.jit,
    static_argnames=("model", "eos_id", "stop_ids", "pad_id", "greedy", "stop_sequences"),
    donate_argnames=("slots",),
)
def decode_slots(
    model: Transformer,
    params,
    slots: Slots,
    min_done,
    *,
    eos_id: int,
    pad_id: int,
    stop_ids: tuple[int, ...] = (),
    temperature: float = 1.0,
    greedy: bool = False,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
) -> Slots:
  """Decodes every live row, each at its own step, until at least `min_done` rows are done (a
  traced count: no recompilation) or every row is; a row ends as in `generate`."""
  model, params = _per_layer(model, params)
  max_new = slots.toks.shape[1]
  prompt_len = slots.cache["key_mask"].shape[1] - max_new
  ender, _ = _end_test(eos_id, stop_ids, stop_sequences)
  columns = jnp.arange(max_new)[None]

  def cond(s: Slots):
    return (jnp.sum(s.done) < min_done) & ~jnp.all(s.done)

  def body(s: Slots):
    rng, key = jax.random.split(s.rng)
    tok, lp = _choose(s.last, key, greedy, temperature)
    live = ~s.done
    tok = jnp.where(live, tok, pad_id)
    here = live[:, None] & (columns == s.step[:, None])
    toks = jnp.where(here, tok[:, None], s.toks)
    lps = jnp.where(here, lp[:, None], s.lps)
    end, recent = ender(tok, s.recent)
    length = s.step + 1
    end = jnp.where((end < 0) & (length >= max_new), FINISH_LENGTH, end)
    ended = live & (end >= 0)
    ends = jnp.where(ended[:, None], jnp.stack([end, length], -1), s.ends)
    logits, cache = model.apply(
        {"params": params},
        tok[:, None],
        live[:, None].astype(jnp.int32),
        cache=s.cache,
        # A done row's index may reach P + R: its write is clamped and lands in its own last
        # slot, which its next request overwrites before reading.
        cache_index=prompt_len + s.step,
    )
    return Slots(cache, logits[:, 0], toks, lps, s.step + live, s.done | ended, ends, recent, rng)

  return jax.lax.while_loop(cond, body, slots)
