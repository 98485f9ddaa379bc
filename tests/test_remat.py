"""model.remat and model.dtype: rematerialised blocks give the gradients of plain ones, and
bfloat16 compute keeps float32 parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax.model import REMAT_POLICIES, ModelConfig, Transformer

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)


def _loss_and_grads(model, params, tokens):
  def loss(p):
    logits, _ = model.apply({"params": p}, tokens, jnp.ones_like(tokens))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_remat_gives_the_same_gradients(remat):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)
  plain = Transformer(CFG)
  params = plain.init(jax.random.key(0), tokens, jnp.ones_like(tokens))["params"]
  want = _loss_and_grads(plain, params, tokens)
  got = _loss_and_grads(Transformer(CFG, remat=remat), params, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_bfloat16_compute_keeps_float32_parameters():
  cfg = ModelConfig(**{**CFG.to_json(), "dtype": "bfloat16"})
  tokens = jnp.zeros((1, 4), jnp.int32)
  model = Transformer(cfg, remat="full")
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, jnp.ones_like(tokens))["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  hlo = (
      jax.jit(lambda p: model.apply({"params": p}, tokens, jnp.ones_like(tokens))[0])
      .lower(params)
      .as_text()
  )
  assert "dot_general" in hlo and "bf16" in hlo
