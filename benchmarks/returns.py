"""Lambda-return targets: `lax.scan` over tokens against `lax.associative_scan` (both in
`dqo_jax.losses.reverse_linear_recurrence`), through `soft_lambda_returns` with importance traces.
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import interleaved, median_ratio, row
from dqo_jax import losses

BATCH = 16


def _inputs(b: int, t: int):
  rng = np.random.default_rng(0)
  lengths = rng.integers(t // 2, t + 1, b)
  f = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, (b, t)), jnp.float32)
  return (
      f(-1, 1),
      f(-1, 1),
      f(-3, 0),
      f(-3, 0),
      losses.mask_from_lengths(jnp.asarray(lengths), t),
      f(-3, 0),
  )


@functools.partial(jax.jit, static_argnames="impl")
def _returns(r, v, pl, rl, mask, bl, impl):
  return losses.soft_lambda_returns(
      r, v, pl, rl, mask, beta=0.1, lam=0.95, behaviour_logprobs=bl, impl=impl
  )


def rows(quick: bool) -> list[dict]:
  lengths = (256, 1024, 4096) if quick else (256, 512, 1024, 2048, 4096, 8192)
  out = []
  for t in lengths:
    args = _inputs(BATCH, t)
    times = interleaved(
        {impl: functools.partial(_returns, *args, impl=impl) for impl in losses.RETURN_IMPLS},
        repeats=5 if quick else 9,
    )
    assoc, scan = statistics.median(times["associative"]), statistics.median(times["scan"])
    out.append(
        row(
            f"lambda returns T={t}",
            assoc * 1e3,
            baseline=scan * 1e3,
            ratio=median_ratio(times["associative"], times["scan"]),
            unit="ms",
            notes=f"associative_scan vs lax.scan (the default); B={BATCH}, importance traces on",
        )
    )
  return out
