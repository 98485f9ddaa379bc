"""Tests for dqo_jax.bandit_losses against docs/method.md ("The baselines").

As in test_losses.py, everything runs with jax_enable_x64 so that the
implementation is held to plain-Python float64 references at ~1e-9. Padded
entries are NaN in every random input: any leak shows up as a NaN.
"""

import math

import hypothesis
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax import bandit_losses as bl

NAN = float("nan")
TOL = 1e-9

_settings = settings(
    max_examples=50, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)


pytestmark = pytest.mark.usefixtures("x64")  # float64 references: see conftest.py


# ----------------------------------------------------------------------------
# Plain-Python float64 references, reading only valid entries.


def softplus(x):
  return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def mean(xs):
  return sum(xs) / len(xs) if xs else 0.0


def ref_sequence_logratio(pl, rl, mask):
  return [
      sum(p - r for p, r, m in zip(prow, rrow, mrow) if m)
      for prow, rrow, mrow in zip(pl.tolist(), rl.tolist(), mask.tolist())
  ]


def ref_dpo(lw, ll, valid, beta):
  pairs = [(w, l) for w, l, m in zip(lw.tolist(), ll.tolist(), valid) if m]
  return mean([softplus(-beta * (w - l)) for w, l in pairs]), {
      "reward_margin_mean": mean([beta * (w - l) for w, l in pairs]),
      "preference_accuracy": mean([1.0 if w > l else 0.0 for w, l in pairs]),
      "chosen_logratio_mean": mean([w for w, _ in pairs]),
      "rejected_logratio_mean": mean([l for _, l in pairs]),
  }


def ref_kto_z0(lm, valid):
  return max(0.0, mean([x for x, m in zip(lm.tolist(), valid) if m]))


def ref_kto(l, correct, z0, valid, beta, lambda_d, lambda_u):
  losses, chosen, rejected = [], [], []
  for x, c, m in zip(l.tolist(), correct.tolist(), valid):
    if not m:
      continue
    if c:
      losses.append(lambda_d - lambda_d * sigmoid(beta * (x - z0)))
      chosen.append(x)
    else:
      losses.append(lambda_u - lambda_u * sigmoid(beta * (z0 - x)))
      rejected.append(x)
  metrics = {
      "z0": z0,
      "chosen_logratio_mean": mean(chosen),
      "rejected_logratio_mean": mean(rejected),
  }
  return mean(losses), metrics


def ref_dro(l, r, v, valid, beta):
  return mean([0.5 * (ri - vi - beta * li) ** 2 for li, ri, vi, m in zip(l, r, v, valid) if m])


# ----------------------------------------------------------------------------
# Data: per-sample vectors with a random mask and NaN on padding.


def padded(x, valid):
  """`x` with NaN wherever `valid` is False."""
  return np.where(valid, x, NAN)


def floats(lo, hi):
  # No subnormals: XLA on CPU flushes them to zero.
  return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def samples(draw, max_b=6):
  n = draw(st.integers(1, max_b))

  def vec(lo, hi):
    return np.asarray(draw(st.lists(floats(lo, hi), min_size=n, max_size=n)))

  valid = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
  return dict(
      valid=valid,
      # None means "all valid", the default of every mask argument.
      mask=draw(st.sampled_from([None, valid.astype(np.float64)])),
      a=vec(-20, 20),
      b=vec(-20, 20),
      c=vec(-3, 3),
      correct=np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
      beta=draw(floats(0.01, 2.0)),
      z0=draw(floats(0.0, 5.0)),
      lambda_d=draw(floats(0.1, 3.0)),
      lambda_u=draw(floats(0.1, 3.0)),
  )


def inputs(d, *keys):
  """The arrays `keys` of `d`, NaN-padded where the mask marks padding."""
  valid = np.ones_like(d["valid"]) if d["mask"] is None else d["valid"]
  return valid.tolist(), [padded(d[k], valid) for k in keys]


# Jitted entry points; beta and the lambdas are traced so hypothesis examples
# share compilations.


@jax.jit
def dpo_jit(lw, ll, beta, pair_mask=None):
  return bl.dpo_loss(lw, ll, beta=beta, pair_mask=pair_mask)


@jax.jit
def kto_jit(l, correct, z0, beta, lambda_d, lambda_u, sample_mask=None):
  return bl.kto_loss(
      l, correct, z0, beta=beta, lambda_d=lambda_d, lambda_u=lambda_u, sample_mask=sample_mask
  )


@jax.jit
def dro_jit(l, r, v, beta, sample_mask=None):
  kw = dict(beta=beta, sample_mask=sample_mask)
  return bl.dro_policy_loss(l, r, v, **kw), bl.dro_value_loss(l, r, v, **kw)


def assert_metrics(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=TOL, atol=TOL, err_msg=k)


# ----------------------------------------------------------------------------
# Against the Python references.


@_settings
@given(
    st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 5).flatmap(
            lambda t: st.tuples(
                st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b),
                st.integers(0, 2**31 - 1),
            )
        )
    )
)
def test_sequence_logratio_matches_reference(mask_and_seed):
  mask, seed = mask_and_seed
  mask = np.asarray(mask)
  rng = np.random.default_rng(seed)
  pl = padded(-rng.uniform(0.0, 5.0, mask.shape), mask)
  rl = padded(-rng.uniform(0.0, 5.0, mask.shape), mask)
  got = jax.jit(bl.sequence_logratio)(pl, rl, mask.astype(np.float64))
  assert got.shape == (mask.shape[0],) and got.dtype == jnp.float64
  np.testing.assert_allclose(
      np.asarray(got), ref_sequence_logratio(pl, rl, mask), rtol=TOL, atol=TOL
  )


@_settings
@given(samples())
def test_dpo_matches_reference(d):
  valid, (lw, ll) = inputs(d, "a", "b")
  loss, metrics = dpo_jit(lw, ll, d["beta"], d["mask"])
  want_loss, want_metrics = ref_dpo(lw, ll, valid, d["beta"])
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(float(loss), want_loss, rtol=TOL, atol=TOL)
  assert_metrics(metrics, want_metrics)


@_settings
@given(samples())
def test_kto_matches_reference(d):
  valid, (l, lm) = inputs(d, "a", "b")
  z0 = bl.kto_z0(lm, sample_mask=d["mask"])
  np.testing.assert_allclose(float(z0), ref_kto_z0(lm, valid), rtol=TOL, atol=TOL)

  args = (d["beta"], d["lambda_d"], d["lambda_u"])
  loss, metrics = kto_jit(l, d["correct"], d["z0"], *args, d["mask"])
  want_loss, want_metrics = ref_kto(l, d["correct"], d["z0"], valid, *args)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(float(loss), want_loss, rtol=TOL, atol=TOL)
  assert_metrics(metrics, want_metrics)


@_settings
@given(samples())
def test_dro_matches_reference(d):
  valid, (l, r, v) = inputs(d, "a", "c", "b")
  policy, value = dro_jit(l, r, v, d["beta"], d["mask"])
  want = ref_dro(l, r, v, valid, d["beta"])
  # The two losses differ only in their stop-gradients.
  np.testing.assert_allclose(float(policy), want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(float(value), want, rtol=TOL, atol=TOL)


@_settings
@given(st.integers(0, 10_000), st.integers(0, 10_000), floats(0.0, 5.0))
def test_kto_lambdas_ratio_in_range(n_d, n_u, target):
  lambda_d, lambda_u = bl.kto_lambdas(n_d, n_u, target_ratio=target)
  assert isinstance(lambda_d, float) and isinstance(lambda_u, float)
  if n_d == 0 or n_u == 0:
    assert (lambda_d, lambda_u) == (1.0, 1.0)
    return
  assert lambda_u == 1.0
  ratio = lambda_d * n_d / (lambda_u * n_u)
  assert 1.0 - 1e-12 <= ratio <= 4.0 / 3.0 + 1e-12
  if 1.0 <= target <= 4.0 / 3.0:
    assert math.isclose(ratio, target, rel_tol=1e-12)


def test_kto_lambdas_cases():
  assert bl.kto_lambdas(10, 30) == (3.0, 1.0)
  assert bl.kto_lambdas(30, 10, target_ratio=4.0 / 3.0) == pytest.approx((4.0 / 9.0, 1.0))
  assert bl.kto_lambdas(10, 30, target_ratio=9.0) == pytest.approx((4.0, 1.0))
  with pytest.raises(ValueError):
    bl.kto_lambdas(-1, 3)


# ----------------------------------------------------------------------------
# Edge cases.


def finite_grads(f, *args):
  grads = jax.grad(f, argnums=tuple(range(len(args))))(*args)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  return grads


def test_dpo_no_valid_pairs_is_zero_with_finite_gradients():
  lw = ll = np.full(3, NAN)
  mask = np.zeros(3)
  loss, metrics = bl.dpo_loss(lw, ll, beta=0.1, pair_mask=mask)
  assert float(loss) == 0.0
  assert all(float(m) == 0.0 for m in metrics.values())
  grads = finite_grads(lambda a, b: bl.dpo_loss(a, b, beta=0.1, pair_mask=mask)[0], lw, ll)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("all_correct", [True, False])
def test_kto_single_class_batches(all_correct):
  l = np.array([0.3, -1.2, 2.5, NAN])
  mask = np.array([1.0, 1.0, 1.0, 0.0])
  correct = np.full(4, all_correct)
  loss, metrics = bl.kto_loss(
      l, correct, jnp.asarray(0.2), beta=0.5, lambda_d=1.5, lambda_u=0.7, sample_mask=mask
  )
  want_loss, want_metrics = ref_kto(l, correct, 0.2, [1, 1, 1, 0], 0.5, 1.5, 0.7)
  np.testing.assert_allclose(float(loss), want_loss, rtol=TOL, atol=TOL)
  assert_metrics(metrics, want_metrics)
  empty = "rejected_logratio_mean" if all_correct else "chosen_logratio_mean"
  assert float(metrics[empty]) == 0.0


def test_one_sample():
  one = lambda x: np.array([x])
  loss, metrics = bl.dpo_loss(one(1.0), one(-0.5), beta=2.0)
  np.testing.assert_allclose(float(loss), softplus(-3.0), rtol=TOL)
  assert float(metrics["preference_accuracy"]) == 1.0

  np.testing.assert_allclose(float(bl.kto_z0(one(-4.0))), 0.0)
  np.testing.assert_allclose(float(bl.kto_z0(one(4.0))), 4.0)
  loss, _ = bl.kto_loss(one(1.0), one(True), jnp.asarray(0.5), beta=2.0, lambda_d=3.0, lambda_u=1.0)
  np.testing.assert_allclose(float(loss), 3.0 * (1.0 - sigmoid(1.0)), rtol=TOL)

  for fn in (bl.dro_policy_loss, bl.dro_value_loss):
    np.testing.assert_allclose(float(fn(one(0.5), one(1.0), one(0.25), beta=0.5)), 0.5 * 0.5**2)


def test_all_padding_gives_zero_and_finite_gradients():
  x = np.full(2, NAN)
  mask = np.zeros(2)
  assert float(bl.kto_z0(x, sample_mask=mask)) == 0.0
  kw = dict(beta=1.0, lambda_d=1.0, lambda_u=1.0, sample_mask=mask)
  kto = lambda l: bl.kto_loss(l, np.array([True, False]), jnp.asarray(0.0), **kw)[0]
  assert float(kto(x)) == 0.0
  finite_grads(kto, x)
  for fn in (bl.dro_policy_loss, bl.dro_value_loss):
    f = lambda l, r, v: fn(l, r, v, beta=1.0, sample_mask=mask)
    assert float(f(x, x, x)) == 0.0
    finite_grads(f, x, x, x)
  pl = np.full((2, 3), NAN)
  assert np.all(np.asarray(bl.sequence_logratio(pl, pl, np.zeros((2, 3)))) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_dtypes(dtype):
  x = jnp.asarray([0.5, -1.0, 2.0], dtype)
  want = jnp.float64 if dtype == jnp.float64 else jnp.float32
  assert bl.sequence_logratio(x[None], x[None], jnp.ones((1, 3))).dtype == want
  assert bl.dpo_loss(x, x, beta=0.1)[0].dtype == want
  assert bl.kto_z0(x).dtype == want
  # A float64 z0 or hyperparameter does not upcast float32 log-ratios.
  assert (
      bl.kto_loss(x, x > 0, jnp.asarray(0.1), beta=0.1, lambda_d=1.0, lambda_u=1.0)[0].dtype == want
  )
  assert bl.dro_policy_loss(x, x, x, beta=0.1).dtype == want
  assert bl.dro_value_loss(x, x, x, beta=0.1).dtype == want


# ----------------------------------------------------------------------------
# Gradients.


def random_vectors(seed, n=5):
  rng = np.random.default_rng(seed)
  mask = np.array([1.0, 1.0, 0.0, 1.0, 0.0])[:n]
  vec = lambda: padded(rng.normal(size=n) * 2, mask > 0)
  return mask, vec


def test_sequence_logratio_gradients():
  mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  pl = padded(-np.ones((2, 3)), mask > 0)
  f = lambda p, r: jnp.sum(bl.sequence_logratio(p, r, mask) * jnp.array([2.0, 3.0]))
  dp, dr = finite_grads(f, pl, pl)
  np.testing.assert_array_equal(dp, mask * np.array([[2.0], [3.0]]))
  # The reference policy is frozen.
  np.testing.assert_array_equal(dr, 0.0)


def test_dpo_gradient():
  mask, vec = random_vectors(0)
  lw, ll, beta = vec(), vec(), 0.7
  dw, dl = finite_grads(lambda a, b: bl.dpo_loss(a, b, beta=beta, pair_mask=mask)[0], lw, ll)
  valid = mask > 0
  margin = np.where(valid, lw - ll, 0.0)
  sig = 1.0 / (1.0 + np.exp(beta * margin))  # sigmoid(-beta margin)
  # d/dl_w = -beta sigmoid(-beta margin) / P; d/dl_l is its negation.
  want = np.where(valid, -beta * sig / valid.sum(), 0.0)
  np.testing.assert_allclose(dw, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dl, -want, rtol=1e-12, atol=1e-12)


def test_kto_gradient_does_not_flow_through_z0():
  mask, vec = random_vectors(1)
  l, lm = vec(), np.abs(vec())  # |.| keeps the mean positive, away from the max(0, .) kink.
  correct = np.array([True, False, True, False, True])
  kw = dict(beta=0.8, lambda_d=1.3, lambda_u=0.9, sample_mask=mask)

  def pipeline(l, lm):
    return bl.kto_loss(l, correct, bl.kto_z0(lm, sample_mask=mask), **kw)[0]

  dl, dlm = finite_grads(pipeline, l, lm)
  np.testing.assert_array_equal(dlm, 0.0)
  # kto_loss stops z0 itself, even when handed one that is not stopped.
  dz0 = jax.grad(lambda z: bl.kto_loss(l, correct, z, **kw)[0])(jnp.asarray(0.3))
  assert float(dz0) == 0.0

  # d/dl (lambda_y - v) = -lambda_y beta s (1 - s) * (+1 desirable, -1 undesirable) / n,
  # with s = sigmoid(+-beta (l - z0)).
  valid = mask > 0
  z0 = ref_kto_z0(lm, valid.tolist())
  sign = np.where(correct, 1.0, -1.0)
  lam = np.where(correct, 1.3, 0.9)
  s = 1.0 / (1.0 + np.exp(-sign * 0.8 * (np.where(valid, l, 0.0) - z0)))
  want = np.where(valid, -lam * 0.8 * s * (1 - s) * sign / valid.sum(), 0.0)
  np.testing.assert_allclose(dl, want, rtol=1e-12, atol=1e-12)


def test_dro_gradients():
  mask, vec = random_vectors(2)
  l, r, v, beta = vec(), vec(), vec(), 0.6
  kw = dict(beta=beta, sample_mask=mask)
  valid = mask > 0
  n = valid.sum()
  a = np.where(valid, r - v - beta * l, 0.0)  # R - V(x) - beta l(y)

  dl, dr, dv = finite_grads(lambda *x: bl.dro_policy_loss(*x, **kw), l, r, v)
  np.testing.assert_allclose(dl, -beta * a / n, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(dv, 0.0)
  np.testing.assert_array_equal(dr, 0.0)

  dl, dr, dv = finite_grads(lambda *x: bl.dro_value_loss(*x, **kw), l, r, v)
  np.testing.assert_array_equal(dl, 0.0)
  np.testing.assert_allclose(dv, -a / n, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(dr, 0.0)


# ----------------------------------------------------------------------------
# jit and vmap.


def all_losses(x):
  """Every loss on one batch dict; used eagerly, jitted and vmapped."""
  l = bl.sequence_logratio(x["pl"], x["rl"], x["tok_mask"])
  lm = jnp.roll(l, 1)  # Another example's response under each prompt.
  dpo, dpo_m = bl.dpo_loss(l, lm, beta=0.3, pair_mask=x["mask"])
  z0 = bl.kto_z0(lm, sample_mask=x["mask"])
  kto, kto_m = bl.kto_loss(
      l, x["correct"], z0, beta=0.3, lambda_d=1.2, lambda_u=1.0, sample_mask=x["mask"]
  )
  kw = dict(beta=0.3, sample_mask=x["mask"])
  return dict(
      l=l,
      dpo=dpo,
      kto=kto,
      z0=z0,
      dro_pi=bl.dro_policy_loss(l, x["r"], x["v"], **kw),
      dro_v=bl.dro_value_loss(l, x["r"], x["v"], **kw),
      **{"dpo_" + k: m for k, m in dpo_m.items()},
      **{"kto_" + k: m for k, m in kto_m.items()},
  )


def random_batch(seed, B=4, T=3):
  rng = np.random.default_rng(seed)
  tok_mask = rng.uniform(size=(B, T)) < 0.7
  mask = rng.uniform(size=B) < 0.7
  return dict(
      pl=padded(-rng.uniform(0, 3, (B, T)), tok_mask),
      rl=padded(-rng.uniform(0, 3, (B, T)), tok_mask),
      tok_mask=tok_mask.astype(np.float64),
      mask=mask.astype(np.float64),
      correct=rng.uniform(size=B) < 0.5,
      r=padded(rng.normal(size=B), mask),
      v=padded(rng.normal(size=B), mask),
  )


def test_jit_matches_eager():
  d = random_batch(3)
  eager, jitted = all_losses(d), jax.jit(all_losses)(d)
  for k in eager:
    assert np.all(np.isfinite(np.asarray(eager[k]))), k
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-12, atol=1e-12, err_msg=k)


def test_vmap_over_stacked_batches():
  batches = [random_batch(s) for s in range(3)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  got = jax.jit(jax.vmap(all_losses))(stacked)
  for i, d in enumerate(batches):
    want = all_losses(d)
    for k in want:
      np.testing.assert_allclose(got[k][i], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
