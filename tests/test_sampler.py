"""The KV-cache sampler against a naive loop over the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax import sharding
from dqo_jax.model import ModelConfig, Transformer
from dqo_jax.sampler import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, generate

CFG = ModelConfig(
    vocab_size=24, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=48
)
EOS, PAD = 3, 0


def _setup():
  model = Transformer(CFG)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens, jnp.ones_like(tokens))["params"])
  prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int32)
  mask = (prompt != 0).astype(np.int32)
  return model, params, prompt, mask


def _greedy(model, params, prompt, mask, n):
  return generate(
      model,
      params,
      prompt,
      mask,
      jax.random.key(1),
      max_new_tokens=n,
      eos_id=EOS,
      pad_id=PAD,
      greedy=True,
  )


def _naive_greedy(model, params, prompt, mask, n):
  """The full forward pass over the whole sequence for every new token, no cache: the sequence
  lives in a buffer of the final width whose unfilled right end is masked (causal attention
  never looks right), so one compiled forward serves every step."""
  b, p = prompt.shape
  toks = np.concatenate([prompt, np.zeros((b, n), np.int32)], 1)
  m = np.concatenate([mask, np.zeros((b, n), np.int32)], 1)
  forward = jax.jit(lambda t, m: model.apply({"params": params}, t, m)[0])
  for i in range(n):
    logits = forward(toks, m)
    toks[:, p + i] = np.asarray(jnp.argmax(logits[:, p + i - 1], -1))
    m[:, p + i] = 1
  return toks[:, p:]


def test_greedy_matches_naive_decoding_until_eos():
  model, params, prompt, mask = _setup()
  s = _greedy(model, params, prompt, mask, 8)
  naive = _naive_greedy(model, params, prompt, mask, 8)
  for i in range(2):
    length = int(s.lengths[i])
    np.testing.assert_array_equal(np.asarray(s.tokens[i, :length]), naive[i, :length])
    assert np.all(np.asarray(s.tokens[i, length:]) == PAD)
    ended = EOS in naive[i]
    assert int(s.finish[i]) == (FINISH_EOS if ended else FINISH_LENGTH)
    assert length == (list(naive[i]).index(EOS) + 1 if ended else 8)


def test_eos_stops_a_row_and_pads_after():
  model, params, prompt, mask = _setup()
  # Make EOS the argmax everywhere by biasing its embedding row with the tied head.
  params["embed"] = params["embed"].at[EOS].mul(50.0)
  s = _greedy(model, params, prompt, mask, 6)
  naive = _naive_greedy(model, params, prompt, mask, 6)
  first = [list(r).index(EOS) if EOS in r else None for r in naive]
  assert any(f is not None for f in first), "the bias should make some row emit EOS"
  for i, f in enumerate(first):
    if f is not None:
      assert int(s.lengths[i]) == f + 1 and int(s.finish[i]) == FINISH_EOS
      assert np.all(np.asarray(s.tokens[i, f + 1 :]) == PAD)
      assert np.all(np.asarray(s.logprobs[i, f + 1 :]) == 0.0)


def test_behaviour_logprobs_are_those_of_the_tempered_distribution():
  model, params, prompt, mask = _setup()
  temperature = 0.7
  s = generate(
      model,
      params,
      prompt,
      mask,
      jax.random.key(3),
      max_new_tokens=5,
      eos_id=EOS,
      pad_id=PAD,
      temperature=temperature,
  )
  toks = np.concatenate([prompt, np.asarray(s.tokens)], 1)
  m = np.concatenate([mask, np.ones_like(np.asarray(s.tokens))], 1)
  logits, _ = model.apply({"params": params}, toks, m)
  logp = jax.nn.log_softmax(logits[:, prompt.shape[1] - 1 : -1] / temperature, -1)
  expected = np.take_along_axis(np.asarray(logp), np.asarray(s.tokens)[..., None], -1)[..., 0]
  for i in range(2):
    n = int(s.lengths[i])
    np.testing.assert_allclose(np.asarray(s.logprobs[i, :n]), expected[i, :n], atol=1e-4)


def test_sampling_is_reproducible_and_seed_dependent():
  model, params, prompt, mask = _setup()
  run = lambda seed: np.asarray(
      generate(
          model,
          params,
          prompt,
          mask,
          jax.random.key(seed),
          max_new_tokens=6,
          eos_id=EOS,
          pad_id=PAD,
      ).tokens
  )
  np.testing.assert_array_equal(run(0), run(0))
  assert any(not np.array_equal(run(0), run(s)) for s in (1, 2, 3))


def _reference_ends(tokens, stops):
  """(length, finish) per row from an unstopped run: the first EOS or stop-sequence suffix."""
  out = []
  for row in np.asarray(tokens).tolist():
    end = (len(row), FINISH_LENGTH)
    for i, t in enumerate(row):
      if t == EOS:
        end = (i + 1, FINISH_EOS)
        break
      if any(i + 1 >= len(s) and tuple(row[i + 1 - len(s) : i + 1]) == s for s in stops):
        end = (i + 1, FINISH_STOP)
        break
    out.append(end)
  return out


def test_stop_sequences_end_a_row_on_its_generated_suffix():
  model, params, prompt, mask = _setup()
  prompt = np.concatenate([prompt, prompt[::-1]])
  mask = np.concatenate([mask, mask[::-1]])
  free = _greedy(model, params, prompt, mask, 10)
  free_tokens = np.asarray(free.tokens)
  # Taken from the unstopped output so they do fire: a pair from row 0, a single token from
  # row 1, and one longer than any output, which never can.
  stops = (
      tuple(free_tokens[0, 3:5].tolist()),
      (int(free_tokens[1, 6]),),
      tuple(range(11)),
  )
  s = generate(
      model,
      params,
      prompt,
      mask,
      jax.random.key(1),
      max_new_tokens=10,
      eos_id=EOS,
      pad_id=PAD,
      greedy=True,
      stop_sequences=stops,
  )
  expected = _reference_ends(free_tokens, stops)
  assert any(f == FINISH_STOP for _, f in expected)
  for i, (length, finish) in enumerate(expected):
    assert (int(s.lengths[i]), int(s.finish[i])) == (length, finish)
    np.testing.assert_array_equal(np.asarray(s.tokens[i, :length]), free_tokens[i, :length])
    assert np.all(np.asarray(s.tokens[i, length:]) == PAD)
    assert np.all(np.asarray(s.logprobs[i, length:]) == 0.0)


def test_sampling_sharded_over_the_data_axes_gives_the_unsharded_tokens():
  model, params, prompt, mask = _setup()
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  prompt = np.tile(prompt, (4, 1))
  prompt[2:, -1] = np.arange(3, 3 + len(prompt) - 2)  # distinct rows
  mask = np.tile(mask, (4, 1))
  kw = dict(max_new_tokens=7, eos_id=EOS, pad_id=PAD, temperature=0.8, stop_sequences=((5, 6),))
  single = generate(model, params, prompt, mask, jax.random.key(4), **kw)
  batch_sh = sharding.batch_sharding(mesh)
  split = generate(
      model,
      jax.device_put(params, sharding.replicated(mesh)),
      jax.device_put(prompt, batch_sh),
      jax.device_put(mask, batch_sh),
      jax.random.key(4),
      mesh=mesh,
      **kw,
  )
  assert split.tokens.sharding.spec[0] == sharding.BATCH
  for a, b in zip(single, split):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


class _TwoStopTokenizer:
  """A chat model's tokenizer in miniature: `eos_id` (end of turn) and a second stop id (end of
  text). Its text is the number of non-special tokens as a GSM8K answer, so a grade shows
  where the text was cut."""

  vocab_size, bos_id, pad_id, add_bos = CFG.vocab_size, 1, PAD, True

  def __init__(self, eos_id, other_stop):
    self.eos_id, self.stop_ids = eos_id, (eos_id, other_stop)

  def decode(self, ids):
    return f"#### {sum(int(i) not in (PAD, *self.stop_ids) for i in ids)}"


def test_every_stop_id_ends_a_row_and_the_reward_sees_the_text_up_to_it():
  """`Tokenizer.stop_ids` used to stop nothing: generation passed only `eos_id`, so a model that
  ended on its other stop id ran to the length limit and got the unparseable reward."""
  from types import SimpleNamespace

  from dqo_jax.generation import generate_all, grade_samples

  model, params, prompt, mask = _setup()
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  run = lambda tok: generate_all(
      model,
      params,
      prompt,
      mask,
      jax.random.key(3),
      tok=tok,
      mesh=mesh,
      batch_size=2,
      max_new_tokens=8,
  )
  free = run(_TwoStopTokenizer(EOS, EOS))
  row = np.asarray(free.tokens[0, : free.lengths[0]])
  # The first token of row 0 that it had not sampled before becomes the second stop id.
  k = next(k for k in range(1, len(row)) if row[k] not in row[:k] and row[k] != EOS)
  tok = _TwoStopTokenizer(EOS, int(row[k]))
  samples = run(tok)  # the same key: the same draws up to the stop
  assert int(samples.lengths[0]) == k + 1 and samples.finish[0] == FINISH_EOS
  np.testing.assert_array_equal(samples.tokens[0, : k + 1], row[: k + 1])
  assert np.all(samples.tokens[0, k + 1 :] == PAD)
  rewards_cfg = SimpleNamespace(correct=1.0, incorrect=0.0, unparseable=-1.0)
  texts, grades, reward = grade_samples("gsm8k", tok, samples, [f"#### {k}"] * 2, rewards_cfg)
  assert texts[0] == f"#### {k}" and grades[0].correct and reward[0] == 1.0


def test_a_shared_prefix_decodes_as_the_repeated_prompt_does():
  """K samples from one prefill against K prefills of the same prompt: greedy tokens and their
  log-probs equal; sampled rows carry the per-token log-probs of the full forward pass, and the
  K copies of a prompt draw different continuations."""
  model, params, prompt, mask = _setup()
  k = 3
  kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  greedy = dict(kw, greedy=True)
  shared = generate(model, params, prompt, mask, jax.random.key(1), samples_per_prompt=k, **greedy)
  rows = np.repeat(np.arange(len(prompt)), k)
  repeated = generate(model, params, prompt[rows], mask[rows], jax.random.key(1), **greedy)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
  np.testing.assert_array_equal(np.asarray(shared.lengths), np.asarray(repeated.lengths))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(repeated.logprobs), atol=1e-5)

  s = generate(model, params, prompt, mask, jax.random.key(5), samples_per_prompt=k, **kw)
  toks = np.asarray(s.tokens)
  assert toks.shape == (len(prompt) * k, 6)
  assert len({tuple(t) for t in toks[:k]}) > 1, "the copies of a prompt should differ"
  full = np.concatenate([prompt[rows], toks], 1)
  full_mask = np.concatenate([mask[rows], np.ones_like(toks)], 1)
  logits, _ = model.apply({"params": params}, full, full_mask)
  logp = jax.nn.log_softmax(logits[:, prompt.shape[1] - 1 : -1], -1)
  expected = np.take_along_axis(np.asarray(logp), toks[..., None], -1)[..., 0]
  live = np.arange(6)[None] < np.asarray(s.lengths)[:, None]
  np.testing.assert_allclose(np.asarray(s.logprobs)[live], expected[live], atol=1e-4)


def test_rollouts_in_length_order_from_shared_prefixes_come_back_in_prefix_order():
  """Greedy completions do not depend on the batching, so every way of batching the rollouts
  must return the same rows: prefix i's M completions at rows i * M ... i * M + M - 1."""
  from types import SimpleNamespace

  from dqo_jax.stages.rollouts import sample_rollouts

  model, params, _, _ = _setup()
  rng = np.random.default_rng(0)
  prefixes = rng.integers(4, CFG.vocab_size, (5, 4)).astype(np.int32)
  mask = np.ones_like(prefixes)
  mask[1, :2] = mask[3, :1] = 0
  prefixes[mask == 0] = PAD
  tok = SimpleNamespace(eos_id=EOS, stop_ids=(EOS,), pad_id=PAD)
  m = 2
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  kw = dict(tok=tok, mesh=mesh, batch_size=4, max_new_tokens=5, greedy=True)
  remaining = np.array([1, 5, 2, 4, 3])
  ways = [
      sample_rollouts(
          model,
          params,
          prefixes,
          mask,
          remaining,
          m,
          jax.random.key(0),
          shared_prefix=s,
          by_length=b,
          **kw,
      )
      for s, b in [(False, False), (True, False), (False, True), (True, True)]
  ]
  single = [_greedy(model, params, prefixes[i : i + 1], mask[i : i + 1], 5) for i in range(5)]
  expected = np.repeat(np.concatenate([np.asarray(s.tokens) for s in single]), m, axis=0)
  for w in ways:
    np.testing.assert_array_equal(w.tokens, expected)


def _varied_lengths_setup(n=13, width=6):
  """A model whose greedy rows end at different steps (weights scaled up, EOS made likelier), and
  n left-padded prompts."""
  model, params, _, _ = _setup()
  params = jax.tree.map(lambda x: x * 8.0, params)
  params["embed"] = params["embed"].at[EOS].mul(3.0)
  rng = np.random.default_rng(0)
  prompt = rng.integers(4, CFG.vocab_size, (n, width)).astype(np.int32)
  lens = rng.integers(1, width + 1, n)
  mask = (np.arange(width)[None] >= width - lens[:, None]).astype(np.int32)
  return model, params, prompt * mask, mask


@pytest.mark.parametrize("k", [1, 2])
def test_refilled_decode_slots_give_the_batches_greedy_tokens(k):
  """Rows of different lengths: with 8 slots refilled 2 * K at a time, every request's greedy
  tokens, lengths, finish reasons and log-probs equal the static batches'."""
  from types import SimpleNamespace

  from dqo_jax.generation import generate_all

  model, params, prompt, mask = _varied_lengths_setup()
  tok = SimpleNamespace(eos_id=EOS, stop_ids=(EOS,), pad_id=PAD)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  kw = dict(tok=tok, mesh=mesh, batch_size=8, max_new_tokens=10, greedy=True, samples_per_prompt=k)
  batches = generate_all(model, params, prompt, mask, jax.random.key(0), **kw)
  slots = generate_all(model, params, prompt, mask, jax.random.key(0), refill_rows=2 * k, **kw)
  assert len(set(batches.lengths.tolist())) >= 3, "the rows should end at different steps"
  for field in ("tokens", "lengths", "finish"):
    np.testing.assert_array_equal(getattr(batches, field), getattr(slots, field))
  np.testing.assert_allclose(batches.logprobs, slots.logprobs, atol=1e-5)


def test_refilled_decode_slots_sample_the_models_distribution_over_the_data_axes():
  """Sampled through refilled slots split over 8 devices: every row's behaviour log-probs are
  those of the full forward pass of its own prompt and tokens, and rows end at EOS or the limit."""
  from types import SimpleNamespace

  from dqo_jax.generation import generate_all

  model, params, prompt, mask = _varied_lengths_setup(n=20)
  tok = SimpleNamespace(eos_id=EOS, stop_ids=(EOS,), pad_id=PAD)
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  k, r = 2, 8
  s = generate_all(
      model,
      params,
      prompt,
      mask,
      jax.random.key(7),
      tok=tok,
      mesh=mesh,
      batch_size=16,
      max_new_tokens=r,
      samples_per_prompt=k,
      refill_rows=16,
  )
  rows = np.repeat(np.arange(len(prompt)), k)
  full = np.concatenate([prompt[rows], s.tokens], 1)
  logits, _ = model.apply(
      {"params": params}, full, np.concatenate([mask[rows], np.ones_like(s.tokens)], 1)
  )
  logp = jax.nn.log_softmax(logits[:, prompt.shape[1] - 1 : -1], -1)
  expected = np.take_along_axis(np.asarray(logp), s.tokens[..., None], -1)[..., 0]
  live = np.arange(r)[None] < s.lengths[:, None]
  # Weights scaled by 8 make logits large: float32 error of about 1e-4 relative.
  np.testing.assert_allclose(s.logprobs[live], expected[live], rtol=5e-4, atol=1e-4)
  assert np.all(s.tokens[~live] == PAD)
  ended_at_eos = s.finish == FINISH_EOS
  assert ended_at_eos.any() and (~ended_at_eos).any()
  assert np.all(s.tokens[np.arange(len(s.tokens)), s.lengths - 1][ended_at_eos] == EOS)
  assert np.all(s.lengths[~ended_at_eos] == r)
