"""`model.attention` kernels compute the same attention; unsupported choices fail clearly."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.attention import inputs
from dqo_jax import attention
from dqo_jax.model import ModelConfig, Transformer

CFG = ModelConfig(
    vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48
)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_xla_matches_einsum(softcap):
  q, k, v, mask = inputs(24, shape=(3, 4, 2, 8), seed=1)
  real = np.asarray(mask[:, -1])  # the rows of real query tokens
  out = {
      impl: attention.attend(q, k, v, mask, scale=0.3, softcap=softcap, impl=impl, cached=False)
      for impl in ("xla", "einsum")
  }
  np.testing.assert_allclose(out["xla"][real], out["einsum"][real], atol=1e-5, rtol=1e-5)
  grads = {
      impl: jax.grad(
          lambda q: jnp.sum(
              attention.attend(q, k, v, mask, scale=0.3, softcap=softcap, impl=impl, cached=False)
              * real[..., None, None]
          )
      )(q)
      for impl in ("xla", "einsum")
  }
  np.testing.assert_allclose(grads["xla"], grads["einsum"], atol=1e-5, rtol=1e-5)


def test_model_logits_equal_across_impls():
  tokens = jnp.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  params = nn.meta.unbox(Transformer(CFG).init(jax.random.key(0), tokens, mask)["params"])
  logits = {
      impl: Transformer(dataclasses.replace(CFG, attention=impl)).apply(
          {"params": params}, tokens, mask
      )[0]
      for impl in ("xla", "einsum")
  }
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(logits["xla"][real], logits["einsum"][real], atol=1e-5)


def test_unsupported_choices_raise():
  with pytest.raises(ValueError, match="expected one of"):
    dataclasses.replace(CFG, attention="flash")
  with pytest.raises(ValueError, match="soft-capping"):
    dataclasses.replace(CFG, attention="cudnn", attn_softcap=50.0)
  with pytest.raises(ValueError, match="sliding"):
    dataclasses.replace(
        CFG, attention="pallas_tpu", layer_types=("sliding", "global"), sliding_window=4
    )
