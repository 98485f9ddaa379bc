"""The decoder: KV-cache decoding equals the full forward pass; padding does not change outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax.model import ModelConfig, Transformer, init_cache

CFG = ModelConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    tie_embeddings=False,
)


def _params(model, seed=0):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(seed), tokens, jnp.ones_like(tokens))["params"])


def test_left_padding_does_not_change_outputs():
  model = Transformer(CFG)
  params = _params(model)
  seq = jnp.array([[5, 6, 7, 8, 9]])
  padded = jnp.array([[0, 0, 0, 5, 6, 7, 8, 9]])
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  a, _ = model.apply({"params": params}, seq, jnp.ones_like(seq))
  b, _ = model.apply({"params": params}, padded, mask)
  np.testing.assert_allclose(a[0], b[0, 3:], atol=1e-5)


@pytest.mark.parametrize("head", ["lm", "value"])
def test_kv_cache_decode_matches_full_forward(head):
  model = Transformer(CFG, head=head)
  params = _params(model)
  rng = np.random.default_rng(0)
  prompt_lens, p, new = np.array([3, 6]), 6, 5
  prompt = np.zeros((2, p), np.int32)
  pmask = np.zeros((2, p), np.int32)
  for i, n in enumerate(prompt_lens):
    prompt[i, p - n :] = rng.integers(4, 40, n)
    pmask[i, p - n :] = 1
  cont = rng.integers(4, 40, (2, new)).astype(np.int32)
  full, _ = model.apply(
      {"params": params},
      np.concatenate([prompt, cont], 1),
      np.concatenate([pmask, np.ones_like(cont)], 1),
  )
  cache = init_cache(CFG, 2, p + new)
  out, cache = model.apply({"params": params}, prompt, pmask, cache=cache, cache_index=0)
  steps = [out]
  for i in range(new):
    out, cache = model.apply(
        {"params": params},
        cont[:, i : i + 1],
        np.ones((2, 1), np.int32),
        cache=cache,
        cache_index=p + i,
    )
    steps.append(out)
  cached = jnp.concatenate(steps, 1)
  valid = np.concatenate([pmask, np.ones_like(cont)], 1).astype(bool)
  np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=1e-4)


def test_rejects_heads_not_divisible_by_kv_heads():
  with pytest.raises(ValueError, match="n_kv_heads"):
    ModelConfig(vocab_size=8, n_heads=3, n_kv_heads=2)
