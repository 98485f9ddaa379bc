"""Length bucketing (dqo_jax.data.batches): deterministic batches, a few widths, little padding."""

import numpy as np
import pytest

from dqo_jax.data import batches


def _lengths(n=2000, seed=0):
  # A long-tailed distribution like GSM8K's solution lengths.
  return np.clip(np.random.default_rng(seed).lognormal(3.8, 0.45, n).astype(np.int64), 1, 250)


def test_widths_are_few_multiples_and_hold_every_length():
  lengths = _lengths()
  widths = batches.bucket_widths(lengths, 4, 256)
  assert 1 <= len(widths) <= 4 and np.all(np.diff(widths) > 0)
  assert np.all((widths % 8 == 0) | (widths == 256)) and widths[-1] >= lengths.max()


def test_widths_minimise_padding_by_brute_force():
  lengths = np.random.default_rng(1).integers(1, 60, 300)
  cands = np.unique(-(-lengths // 8) * 8)
  padding = lambda w: np.sum(w[np.searchsorted(w, lengths)] - lengths)
  best = min(
      padding(np.array(sorted(set(c) | {cands[-1]})))
      for c in ((a, b) for i, a in enumerate(cands) for b in cands[i:])
  )
  assert padding(batches.bucket_widths(lengths, 3, 64)) == best


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch_once():
  lengths = _lengths(1000)
  widths = batches.bucket_widths(lengths, 4, 256)
  steps = range(1000 // 16)
  first = [batches.bucketed_batch_indices(lengths, widths, 16, s, seed=3) for s in steps]
  again = [batches.bucketed_batch_indices(lengths, widths, 16, s, seed=3) for s in reversed(steps)]
  for a, b in zip(first, reversed(again)):
    np.testing.assert_array_equal(a, b)
  seen = np.concatenate(first)
  assert len(set(seen.tolist())) == len(seen)  # an epoch draws each example at most once
  # The same examples as the unbucketed epoch, in another order.
  plain = np.concatenate([batches.batch_indices(1000, 16, s, 3) for s in steps])
  assert set(seen.tolist()) == set(plain.tolist())
  nxt = batches.bucketed_batch_indices(lengths, widths, 16, len(steps), seed=3)
  assert not np.array_equal(nxt, first[0])  # the next epoch is reshuffled


def test_bucketing_cuts_padding_and_keeps_every_token():
  lengths = _lengths()
  widths = batches.bucket_widths(lengths, 4, 256)
  arrays = dict(
      response=np.where(np.arange(256)[None] < lengths[:, None], 7, 0),
      ref_logprobs=np.zeros((len(lengths), 256), np.float32),
      response_len=lengths,
      prompt=np.ones((len(lengths), 32), np.int32),
  )
  real = padded = 0
  for step in range(len(lengths) // 32):
    idx = batches.bucketed_batch_indices(lengths, widths, 32, step, seed=0)
    batch = batches.cut_to_width(batches.take(arrays, idx), widths, lengths[idx].max())
    assert batch["response"].shape[1] in widths and batch["prompt"].shape == (32, 32)
    assert batch["ref_logprobs"].shape == batch["response"].shape
    assert np.all((batch["response"] == 7).sum(1) == lengths[idx])  # nothing cut off
    real += lengths[idx].sum()
    padded += batch["response"].size
  fixed = 1 - real / (256 * 32 * (len(lengths) // 32))
  assert 1 - real / padded < fixed / 2


def test_train_view_keeps_pairs_together_and_deterministic():
  n, width = 64, 40
  lengths = np.random.default_rng(0).integers(1, width + 1, n).astype(np.int32)
  arrays = dict(
      response=np.where(np.arange(width)[None] < lengths[:, None], 5, 0),
      response_len=lengths,
      row=np.arange(n),
  )
  pairs = np.stack([np.arange(0, n, 2), np.arange(1, n, 2)], 1)
  batch_at = batches.batch_fn(arrays, len(pairs), 4, 0, 3, rows=lambda idx: pairs[idx])
  widths = set()
  for step in range(2 * len(pairs) // 4):
    batch = batch_at(step)
    np.testing.assert_array_equal(batch["row"], batch_at(step)["row"])
    first, second = batch["row"][:4], batch["row"][4:]
    np.testing.assert_array_equal(second, first + 1)  # (first, second) of the same pair
    assert batch["response"].shape[1] >= batch["response_len"].max()
    widths.add(batch["response"].shape[1])
  assert 1 < len(widths) <= 3
  unbucketed = batches.batch_fn(arrays, len(pairs), 4, 0, 1, rows=lambda idx: pairs[idx])
  for step in range(len(pairs) // 4):
    batch = unbucketed(step)
    # Plain batches keep their epoch order and are cut to the multiple of 8 (or the arrays'
    # width) that holds their longest response.
    want = min(-(-batch["response_len"].max() // 8) * 8, width)
    assert batch["response"].shape == (8, want)


def test_too_few_examples_raise():
  with pytest.raises(ValueError, match="cannot fill"):
    batches.bucketed_batch_indices(np.ones(3, np.int64), np.array([8]), 4, 0, 0)


def test_cutting_trailing_padding_leaves_the_log_probs_as_they_were():
  import jax
  import jax.numpy as jnp

  from dqo_jax.model import ModelConfig, Transformer
  from dqo_jax.train.forward import response_logprobs

  rng = np.random.default_rng(0)
  n, p, width = 16, 6, 40
  lengths = rng.integers(1, 20, n).astype(np.int32)
  arrays = dict(
      prompt=rng.integers(1, 32, (n, p)).astype(np.int32),
      prompt_mask=np.ones((n, p), np.int32),
      response=np.where(
          np.arange(width)[None] < lengths[:, None], rng.integers(1, 32, (n, width)), 0
      ),
      response_len=lengths,
  )
  model = Transformer(
      ModelConfig(
          vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
      )
  )
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))[
      "params"
  ]
  batch = batches.batch_fn(arrays, n, 8, 0, 1)(0)
  assert batch["response"].shape[1] == 24 < width  # the longest of these 8 is 17
  idx = batches.batch_indices(n, 8, 0, 0)
  full = batches.take(arrays, idx)
  cut = response_logprobs(model, params, batch)
  whole = response_logprobs(model, params, full)[:, :24]
  valid = np.arange(24)[None] < batch["response_len"][:, None]
  np.testing.assert_allclose(np.asarray(cut)[valid], np.asarray(whole)[valid], rtol=1e-6, atol=1e-6)
