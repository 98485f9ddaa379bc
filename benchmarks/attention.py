"""Attention kernels: `model.attention`'s default ("xla": jax.nn.dot_product_attention) against
the written-out einsum, forward+backward of the attention op alone, causal with left padding."""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import interleaved, median_ratio, row
from dqo_jax import attention

# batch, query heads, kv heads, head dim
SHAPE = (1, 8, 2, 64)


def inputs(length: int, shape=SHAPE, seed: int = 0):
  """q [B, L, N, Dh], k and v [B, K, L, Dh] and a causal mask [B, L, L] with left padding."""
  b, n, kv, d = shape
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, length, n, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, kv, length, d)), jnp.float32) for _ in range(2))
  real = np.arange(length)[None] >= rng.integers(0, length // 4, b)[:, None]
  mask = np.tril(np.ones((length, length), bool))[None] & real[:, None, :]
  return q, k, v, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames="impl")
def _forward_backward(q, k, v, mask, impl):
  loss = lambda q, k, v: jnp.sum(
      attention.attend(
          q, k, v, mask, scale=q.shape[-1] ** -0.5, softcap=0.0, impl=impl, cached=False
      )
  )
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def rows(quick: bool, lengths=None) -> list[dict]:
  lengths = lengths or ((512, 1024) if quick else (512, 1024, 2048, 4096))
  out = []
  for length in lengths:
    args = inputs(length)
    times = interleaved(
        {
            impl: functools.partial(_forward_backward, *args, impl=impl)
            for impl in ("xla", "einsum")
        },
        repeats=5 if quick else 7,
    )
    out.append(
        row(
            f"attention fwd+bwd L={length}",
            statistics.median(times["xla"]) * 1e3,
            baseline=statistics.median(times["einsum"]) * 1e3,
            ratio=median_ratio(times["xla"], times["einsum"]),
            unit="ms",
            notes="dot_product_attention (xla, the default) vs einsum; B, N, K, Dh = "
            + ", ".join(map(str, SHAPE)),
        )
    )
  return out
