"""The optimizers a config may name (`dqo_jax/train/state.py`): what state each keeps per
parameter, Adafactor's first step against a float64 reference, and that each descends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import optimizer
from dqo_jax.train.state import make_optimizer


def _config(name="adamw", mu_dtype="float32", lr=1e-2):
  c = optimizer(lr, 0)
  c.update(name=name, mu_dtype=mu_dtype)
  return c


PARAMS = {"w": jnp.ones((256, 384)), "b": jnp.ones((384,))}


@pytest.mark.parametrize(
    "name, mu_dtype, bytes_per_param",
    [("adamw", "float32", 8.0), ("adamw", "bfloat16", 6.0), ("adafactor", "float32", 0.02)],
)
def test_state_bytes_per_parameter(name, mu_dtype, bytes_per_param):
  state = make_optimizer(_config(name, mu_dtype), 10).init(PARAMS)
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  n = sum(x.size for x in jax.tree.leaves(PARAMS))
  per_param = sum(x.size * x.dtype.itemsize for x in arrays) / n
  # Adafactor: a row and a column mean for the matrix, the whole second moment for the vector.
  assert per_param == pytest.approx(bytes_per_param, abs=0.05)


def test_adafactor_first_step_is_lr_times_the_sign_of_the_gradient():
  """At t = 1 its second moment is g^2 (decay 1 - 1^-0.8 = 0), so the update is g / |g|,
  whose block RMS is 1 (not clipped), times the learning rate (no warm-up here)."""
  rng = np.random.default_rng(0)
  grads = {k: jnp.asarray(rng.normal(size=v.shape) * 1e-3, jnp.float32) for k, v in PARAMS.items()}
  tx = make_optimizer(_config("adafactor", lr=0.01), 10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  for k, g in grads.items():
    expected = -0.01 * np.sign(np.asarray(g, np.float64))
    # The matrix's factored moment is exactly g^2 only where g^2 is rank one; elsewhere the
    # update keeps g's sign and its block RMS is at most 1.
    u = np.asarray(updates[k], np.float64)
    assert np.all(np.sign(u) == np.sign(expected))
    if g.ndim == 1:
      np.testing.assert_allclose(u, expected, rtol=1e-5)
    assert np.sqrt(np.mean(u**2)) <= 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("name, mu_dtype", [("adamw", "bfloat16"), ("adafactor", "float32")])
def test_every_optimizer_descends_a_quadratic(name, mu_dtype):
  target = jax.tree.map(lambda p: 0.5 * p, PARAMS)
  loss = lambda p: sum(
      jnp.mean((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )
  tx = make_optimizer(_config(name, mu_dtype, lr=0.05), 50)
  params, state = PARAMS, tx.init(PARAMS)
  start = float(loss(params))
  for _ in range(50):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert float(loss(params)) < 0.05 * start
