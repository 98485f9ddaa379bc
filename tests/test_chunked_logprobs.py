"""model.logprob_chunk: response log-probs computed a few positions at a time equal the full
logits' log-softmax, with the same gradients, and the step that uses them holds less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax.model import ModelConfig, Transformer
from dqo_jax.train.forward import response_logprobs, response_mask

CFG = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)


def _batch(cfg, b=3, p=5, r=7, seed=0):
  rng = np.random.default_rng(seed)
  prompt_len = np.array([5, 2, 4])[:b]
  return dict(
      prompt=jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p)), jnp.int32),
      prompt_mask=jnp.asarray(np.arange(p)[None] >= p - prompt_len[:, None], jnp.int32),
      response=jnp.asarray(rng.integers(1, cfg.vocab_size, (b, r)), jnp.int32),
      response_len=jnp.asarray([7, 3, 5][:b], jnp.int32),
  )


def _init(model, batch):
  tokens = jnp.concatenate([batch["prompt"], batch["response"]], axis=1)
  return model.init(jax.random.key(1), tokens, jnp.ones_like(tokens))["params"]


def _reference(model, params, batch):
  """log_softmax of the whole [B, L, V] logits, read at the response tokens."""
  p = batch["prompt"].shape[1]
  tokens = jnp.concatenate([batch["prompt"], batch["response"]], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], response_mask(batch)], axis=1).astype(jnp.int32)
  logits, _ = model.apply({"params": params}, tokens[:, :-1], mask[:, :-1])
  logp = jax.nn.log_softmax(logits[:, p - 1 :].astype(jnp.float64), axis=-1)
  return jnp.take_along_axis(logp, batch["response"][..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 64])
def test_chunked_logprobs_equal_the_full_logits(x64, chunk, tied, softcap):
  cfg = ModelConfig(**{**CFG.to_json(), "tie_embeddings": tied, "final_softcap": softcap})
  batch = _batch(cfg)
  params = _init(Transformer(cfg), batch)
  want = _reference(Transformer(cfg), params, batch)
  got = response_logprobs(Transformer(cfg, logprob_chunk=chunk), params, batch)
  assert got.shape == batch["response"].shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_have_the_full_gradients():
  batch = _batch(CFG)
  params = _init(Transformer(CFG), batch)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=batch["response"].shape), jnp.float32)

  def grads(chunk):
    model = Transformer(CFG, logprob_chunk=chunk)
    loss = lambda p: jnp.sum(weights * response_logprobs(model, p, batch))
    return jax.jit(jax.grad(loss))(params)

  want, got = grads(0), grads(3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def _temp_bytes(chunk, vocab):
  cfg = ModelConfig(**{**CFG.to_json(), "vocab_size": vocab})
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((8,) + x.shape[1:], x.dtype), _batch(cfg))
  batch["prompt"] = jax.ShapeDtypeStruct((8, 64), jnp.int32)
  batch["prompt_mask"] = batch["prompt"]
  batch["response"] = jax.ShapeDtypeStruct((8, 192), jnp.int32)
  model = Transformer(cfg, logprob_chunk=chunk)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens)["params"])
  loss = lambda p, b: jnp.mean(response_logprobs(model, p, b))
  compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunking_bounds_the_logits_memory_at_a_large_vocabulary():
  # XLA's buffer assignment of the gradient of the response log-probs, 8 x 192 response
  # positions at a 32k vocabulary, whose float32 logits take 8 * 192 * 32768 * 4 bytes = 192 MiB.
  logits_bytes = 8 * 192 * 32_768 * 4
  whole, by_32, by_16 = (_temp_bytes(c, 32_768) for c in (0, 32, 16))
  assert whole > 2 * logits_bytes  # the logits and their cotangent, whole
  # Chunked, what is held grows with the chunk (a chunk's logits and cotangent, 2 MiB a position)
  # and stays well under the whole logits.
  assert by_16 < by_32 < 0.4 * whole, (by_16, by_32, whole)
  assert by_32 - by_16 <= 2 * 16 * 8 * 32_768 * 4 * 1.01
