"""Tests for dqo_jax.losses against docs/method.md.

Everything runs with jax_enable_x64 so that the implementation can be held to
float64 references at ~1e-9; float32 round-off would hide index and sign bugs
in short sequences.
"""

import functools
import math

import hypothesis
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqo_jax import losses

INF = float("inf")
TOL = 1e-9

_settings = settings(
    max_examples=50, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)


pytestmark = pytest.mark.usefixtures("x64")  # float64 references: see conftest.py


# ----------------------------------------------------------------------------
# Plain-Python float64 references: loops over python floats, one row at a time,
# reading nothing at or past a row's length. They use the V-trace form of the
# recursion for every case, so the implementation's separate no-correction
# branch is checked against an independent formula.


def ref_returns_row(r, v, pl, rl, bl, length, beta, lam, rho_max, c_max):
  g = [0.0] * len(r)
  g_next = 0.0
  for t in reversed(range(length)):
    v_next = v[t + 1] if t + 1 < length else 0.0
    soft_r = r[t] - beta * (pl[t] - rl[t])
    if bl is None:
      rho = c = 1.0
    else:
      ratio = math.exp(pl[t] - bl[t])
      rho, c = min(rho_max, ratio), min(c_max, ratio)
    delta = soft_r + v_next - v[t]
    g[t] = v[t] + rho * delta + lam * c * (g_next - v_next)
    g_next = g[t]
  return g


def ref_returns(r, v, pl, rl, bl, lengths, beta, lam, rho_max, c_max):
  rows = []
  for b, length in enumerate(lengths):
    rows.append(
        ref_returns_row(
            r[b].tolist(),
            v[b].tolist(),
            pl[b].tolist(),
            rl[b].tolist(),
            None if bl is None else bl[b].tolist(),
            int(length),
            float(beta),
            float(lam),
            rho_max,
            c_max,
        )
    )
  return rows


def ref_mean(per_token_rows, lengths, normalize):
  if normalize == "token":
    total, count = 0.0, 0
    for row, length in zip(per_token_rows, lengths):
      for t in range(length):
        total += row[t]
        count += 1
    return total / count if count else 0.0
  seq_means = []
  for row, length in zip(per_token_rows, lengths):
    if length:
      seq_means.append(sum(row[t] for t in range(length)) / length)
  return sum(seq_means) / len(seq_means) if seq_means else 0.0


def ref_value_loss(v, g, lengths, normalize):
  rows = [
      [(vt - gt) ** 2 for vt, gt in zip(v[b].tolist(), g[b].tolist())] for b in range(len(lengths))
  ]
  return ref_mean(rows, lengths, normalize)


def ref_q_targets_row(r, v, g, length, lam):
  y = [0.0] * len(r)
  for t in range(length):
    v_next = v[t + 1] if t + 1 < length else 0.0
    g_next = g[t + 1] if t + 1 < length else 0.0
    y[t] = r[t] + (1.0 - lam) * v_next + lam * g_next - v[t]
  return y


def ref_q_loss(pl, rl, v, r, g, lengths, beta, lam, normalize):
  rows = []
  for b, length in enumerate(lengths):
    y = ref_q_targets_row(r[b].tolist(), v[b].tolist(), g[b].tolist(), int(length), float(lam))
    rows.append([(beta * (p - q) - yt) ** 2 for p, q, yt in zip(pl[b].tolist(), rl[b].tolist(), y)])
  return ref_mean(rows, lengths, normalize)


# ----------------------------------------------------------------------------
# Jitted entry points; beta and lam are traced so hypothesis examples share
# compilations.


@functools.partial(jax.jit, static_argnames=("rho_max", "c_max", "impl"))
def returns_jit(r, v, pl, rl, mask, beta, lam, bl=None, rho_max=1.0, c_max=1.0, impl="scan"):
  return losses.soft_lambda_returns(
      r,
      v,
      pl,
      rl,
      mask,
      beta=beta,
      lam=lam,
      behaviour_logprobs=bl,
      rho_max=rho_max,
      c_max=c_max,
      impl=impl,
  )


@functools.partial(jax.jit, static_argnames=("normalize",))
def q_loss_jit(pl, rl, v, r, g, mask, beta, lam, normalize="token"):
  return losses.dqo_q_loss(pl, rl, v, r, g, mask, beta=beta, lam=lam, normalize=normalize)


@functools.partial(jax.jit, static_argnames=("normalize",))
def value_loss_jit(v, g, mask, normalize="token"):
  return losses.dqo_value_loss(v, g, mask, normalize=normalize)


# ----------------------------------------------------------------------------
# Data.

TRACE_CONFIGS = [(1.0, 1.0), (2.0, 1.0), (0.5, 0.5), (1.5, 0.8), (INF, 1.0), (INF, INF)]


@st.composite
def batches(draw):
  T = draw(st.integers(1, 5))
  # Every batch holds an empty row and a full row, next to random lengths.
  lengths = draw(st.lists(st.integers(0, T), min_size=1, max_size=3)) + [0, T]
  lengths = draw(st.permutations(lengths))
  B = len(lengths)

  def arr(lo, hi):
    return draw(
        hnp.arrays(
            np.float64, (B, T), elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        )
    )

  return dict(
      lengths=np.asarray(lengths),
      T=T,
      r=arr(-3, 3),
      v=arr(-3, 3),
      g=arr(-5, 5),
      pl=arr(-5, 0),
      rl=arr(-5, 0),
      bl=arr(-5, 0),
      beta=draw(st.floats(0.01, 2.0)),
      lam=draw(st.floats(0.0, 1.0)),
      traces=draw(st.sampled_from([None] + TRACE_CONFIGS)),
      normalize=draw(st.sampled_from(["token", "sequence"])),
  )


def random_batch(seed, lengths, T):
  rng = np.random.default_rng(seed)
  B = len(lengths)
  lengths = np.asarray(lengths)
  return dict(
      lengths=lengths,
      mask=np.asarray(losses.mask_from_lengths(jnp.asarray(lengths), T)),
      r=rng.normal(size=(B, T)),
      v=rng.normal(size=(B, T)),
      pl=-rng.uniform(0.1, 3, size=(B, T)),
      rl=-rng.uniform(0.1, 3, (B, T)),
      bl=-rng.uniform(0.1, 3, size=(B, T)),
  )


def np_next(x, lengths):
  """x[:, t + 1] inside each row, 0 at and past the last valid token."""
  out = np.zeros_like(x)
  for b, length in enumerate(lengths):
    out[b, : max(length - 1, 0)] = x[b, 1:length]
  return out


def traced_returns(r, v, pl, rl, mask, behaviour, *, beta, lam, traces):
  """`soft_lambda_returns` with `traces` None (no correction) or (rho_max, c_max)."""
  rho_max, c_max = traces or (1.0, 1.0)
  return losses.soft_lambda_returns(
      r,
      v,
      pl,
      rl,
      mask,
      beta=beta,
      lam=lam,
      behaviour_logprobs=None if traces is None else behaviour,
      rho_max=rho_max,
      c_max=c_max,
  )


def returns_of(d, beta, lam, traces):
  return np.asarray(
      traced_returns(
          d["r"], d["v"], d["pl"], d["rl"], d["mask"], d["bl"], beta=beta, lam=lam, traces=traces
      )
  )


# ----------------------------------------------------------------------------
# Scan and losses against the Python references.


@_settings
@given(batches())
def test_scan_matches_python_loop(d):
  mask = losses.mask_from_lengths(jnp.asarray(d["lengths"]), d["T"])
  traces = d["traces"]
  rho_max, c_max = traces or (1.0, 1.0)
  bl = None if traces is None else d["bl"]
  got = returns_jit(
      d["r"], d["v"], d["pl"], d["rl"], mask, d["beta"], d["lam"], bl, rho_max=rho_max, c_max=c_max
  )
  want = ref_returns(
      d["r"], d["v"], d["pl"], d["rl"], bl, d["lengths"], d["beta"], d["lam"], rho_max, c_max
  )
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


@st.composite
def long_batches(draw):
  """Random lengths up to T = 64, lam in {0, 0.5, 1}, importance traces on or off."""
  T = draw(st.integers(1, 64))
  lengths = np.asarray(draw(st.lists(st.integers(0, T), min_size=1, max_size=4)))
  traces = draw(st.sampled_from([None, (1.0, 1.0), (2.0, 1.0), (1.5, 0.8)]))
  lam = draw(st.sampled_from([0.0, 0.5, 1.0]))
  d = random_batch(draw(st.integers(0, 2**32 - 1)), lengths, T)
  return dict(d, T=T, traces=traces, lam=lam, beta=draw(st.floats(0.01, 2.0)))


@_settings
@given(long_batches())
def test_associative_matches_scan_and_python_loop(d):
  rho_max, c_max = d["traces"] or (1.0, 1.0)
  bl = None if d["traces"] is None else d["bl"]
  args = (d["r"], d["v"], d["pl"], d["rl"], d["mask"], d["beta"], d["lam"], bl)
  got = {
      impl: np.asarray(returns_jit(*args, rho_max=rho_max, c_max=c_max, impl=impl))
      for impl in losses.RETURN_IMPLS
  }
  want = ref_returns(
      d["r"], d["v"], d["pl"], d["rl"], bl, d["lengths"], d["beta"], d["lam"], rho_max, c_max
  )
  for impl in losses.RETURN_IMPLS:
    np.testing.assert_allclose(got[impl], np.asarray(want), rtol=TOL, atol=TOL, err_msg=impl)
  np.testing.assert_allclose(got["associative"], got["scan"], rtol=TOL, atol=TOL)


def test_associative_matches_scan_in_float32():
  T, lengths = 2048, [2048, 1500, 1, 0]
  d = jax.tree.map(lambda x: np.asarray(x, np.float32), random_batch(0, lengths, T))
  got = {
      impl: returns_jit(d["r"], d["v"], d["pl"], d["rl"], d["mask"], 0.1, 0.95, d["bl"], impl=impl)
      for impl in losses.RETURN_IMPLS
  }
  assert got["associative"].dtype == jnp.float32
  np.testing.assert_allclose(got["associative"], got["scan"], rtol=1e-5, atol=1e-5)


def test_reverse_linear_recurrence_rejects_an_unknown_impl():
  with pytest.raises(ValueError, match="impl"):
    losses.reverse_linear_recurrence(jnp.ones((1, 2)), jnp.ones((1, 2)), impl="loop")


@_settings
@given(batches())
def test_q_loss_matches_reference(d):
  mask = losses.mask_from_lengths(jnp.asarray(d["lengths"]), d["T"])
  got = q_loss_jit(
      d["pl"], d["rl"], d["v"], d["r"], d["g"], mask, d["beta"], d["lam"], normalize=d["normalize"]
  )
  want = ref_q_loss(
      d["pl"], d["rl"], d["v"], d["r"], d["g"], d["lengths"], d["beta"], d["lam"], d["normalize"]
  )
  np.testing.assert_allclose(float(got), want, rtol=TOL, atol=TOL)

  y = losses.q_targets(d["r"], d["v"], d["g"], mask, lam=d["lam"])
  want_y = [
      ref_q_targets_row(
          d["r"][b].tolist(), d["v"][b].tolist(), d["g"][b].tolist(), int(n), d["lam"]
      )
      for b, n in enumerate(d["lengths"])
  ]
  np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=TOL, atol=TOL)


@_settings
@given(batches())
def test_value_loss_matches_reference(d):
  mask = losses.mask_from_lengths(jnp.asarray(d["lengths"]), d["T"])
  got = value_loss_jit(d["v"], d["g"], mask, normalize=d["normalize"])
  want = ref_value_loss(d["v"], d["g"], d["lengths"], d["normalize"])
  np.testing.assert_allclose(float(got), want, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------
# Check cases from the method doc.

LENGTHS, T = [0, 1, 3, 5, 4], 5


@pytest.mark.parametrize("traces", [None, (2.0, 1.0), (INF, INF)])
def test_lambda_zero_is_one_step_td(traces):
  d = random_batch(0, LENGTHS, T)
  beta = 0.3
  g = returns_of(d, beta, 0.0, traces)
  valid = d["mask"] > 0
  v = np.where(valid, d["v"], 0.0)
  v_next = np_next(d["v"], LENGTHS)
  l = d["pl"] - d["rl"]
  delta = d["r"] - beta * l + v_next - v
  if traces is None:
    rho = np.ones_like(v)
  else:
    rho = np.minimum(traces[0], np.exp(d["pl"] - d["bl"]))
  # G_t = V(s_t) + rho_t delta_t
  np.testing.assert_allclose(g, np.where(valid, v + rho * delta, 0.0), rtol=1e-12, atol=1e-12)
  # y_t + V(s_t) = r_t + V(s_{t+1}), whatever the returns are.
  for returns in (g, np.full_like(g, 7.0)):
    y = np.asarray(losses.q_targets(d["r"], d["v"], returns, d["mask"], lam=0.0))
    np.testing.assert_allclose(y + v, np.where(valid, d["r"] + v_next, 0.0), rtol=1e-12, atol=1e-12)


def test_lambda_one_is_monte_carlo_and_ignores_values():
  d = random_batch(1, LENGTHS, T)
  beta = 0.7
  g = returns_of(d, beta, 1.0, None)
  soft_r = d["r"] - beta * (d["pl"] - d["rl"])
  want = np.zeros_like(g)
  for b, n in enumerate(LENGTHS):
    for t in range(n):
      want[b, t] = soft_r[b, t:n].sum()
  np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)

  other = dict(d, v=np.random.default_rng(2).normal(size=d["v"].shape) * 10)
  np.testing.assert_allclose(returns_of(other, beta, 1.0, None), g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("traces", [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (INF, INF)])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
def test_unit_ratio_traces_equal_no_correction(traces, lam):
  d = random_batch(3, LENGTHS, T)
  plain = returns_of(d, 0.4, lam, None)
  unit = returns_of(dict(d, bl=d["pl"]), 0.4, lam, traces)
  np.testing.assert_allclose(unit, plain, rtol=1e-12, atol=1e-12)
  # A ratio away from 1 must change G, or the equality above proves nothing.
  if lam > 0:
    off = returns_of(dict(d, bl=d["pl"] + 0.5), 0.4, lam, traces)
    assert np.max(np.abs(off - plain)) > 1e-3


def path_consistent_batch(seed, beta):
  """beta * l_t = r_t + V(s_{t+1}) - V(s_t) on every valid token."""
  d = random_batch(seed, LENGTHS, T)
  valid = d["mask"] > 0
  v_next = np_next(d["v"], LENGTHS)
  l = (d["r"] + v_next - d["v"]) / beta
  d["pl"] = np.where(valid, d["rl"] + l, d["pl"])
  return d


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("traces", [None, (1.0, 1.0), (2.0, 0.5), (INF, INF)])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_path_consistency_zeroes_losses_and_gradients(lam, traces, normalize):
  beta = 0.25
  d = path_consistent_batch(4, beta)

  def both(pl, v):
    g = traced_returns(
        d["r"], v, pl, d["rl"], d["mask"], d["bl"], beta=beta, lam=lam, traces=traces
    )
    l_q = losses.dqo_q_loss(
        pl, d["rl"], v, d["r"], g, d["mask"], beta=beta, lam=lam, normalize=normalize
    )
    l_v = losses.dqo_value_loss(v, g, d["mask"], normalize=normalize)
    return l_q, l_v, g

  l_q, l_v, g = both(d["pl"], d["v"])
  # Round-off in delta_t, scaled by rho_t up to ~20 (rho_max = inf), leaves
  # residuals near 1e-12; a real inconsistency is O(1).
  np.testing.assert_allclose(g, np.where(d["mask"] > 0, d["v"], 0.0), atol=1e-10)
  assert abs(float(l_q)) < 1e-20 and abs(float(l_v)) < 1e-20
  grad_q = jax.grad(lambda pl, v: both(pl, v)[0], argnums=(0, 1))(d["pl"], d["v"])
  grad_v = jax.grad(lambda pl, v: both(pl, v)[1], argnums=(0, 1))(d["pl"], d["v"])
  for grad in grad_q + grad_v:
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)
  # Off the consistent manifold the losses are clearly nonzero.
  l_q2, l_v2, _ = both(d["pl"] + 0.3 * d["mask"], d["v"] + d["mask"])
  assert float(l_q2) > 1e-3 and float(l_v2) > 1e-3


def advantages_np(d, g, beta, lam):
  """A_t = delta_t + lam (G_{t+1} - V(s_{t+1})), from the doc, in numpy."""
  valid = d["mask"] > 0
  v = np.where(valid, d["v"], 0.0)
  v_next, g_next = np_next(d["v"], LENGTHS), np_next(g, LENGTHS)
  delta = d["r"] - beta * (d["pl"] - d["rl"]) + v_next - v
  return np.where(valid, delta + lam * (g_next - v_next), 0.0)


def token_weights(lengths, T, normalize):
  """d(mean)/d(x_t) for masked_mean: which share each token gets."""
  w = np.zeros((len(lengths), T))
  n_seq = sum(1 for n in lengths if n)
  for b, n in enumerate(lengths):
    if n == 0:
      continue
    w[b, :n] = 1.0 / sum(lengths) if normalize == "token" else 1.0 / (n * n_seq)
  return w


@pytest.mark.parametrize("traces", [None, (2.0, 1.0)])
def test_gradient_identity_single_token(traces):
  # One valid token in the batch: the loss is that token's L_Q,t.
  lengths = [0, 1, 0]
  d = random_batch(5, lengths, 4)
  beta, lam = 0.5, 0.8
  g = traced_returns(
      d["r"], d["v"], d["pl"], d["rl"], d["mask"], d["bl"], beta=beta, lam=lam, traces=traces
  )
  grad = jax.grad(
      lambda pl: losses.dqo_q_loss(pl, d["rl"], d["v"], d["r"], g, d["mask"], beta=beta, lam=lam)
  )(d["pl"])
  # Single terminal token: A = r - beta l - V(s_t).
  a = d["r"][1, 0] - beta * (d["pl"][1, 0] - d["rl"][1, 0]) - d["v"][1, 0]
  want = np.zeros_like(d["pl"])
  want[1, 0] = -2 * beta * a
  np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("traces", [None, (2.0, 1.0), (0.5, 0.5)])
def test_gradient_identity_aggregate(traces, normalize):
  d = random_batch(6, LENGTHS, T)
  beta, lam = 0.5, 0.7

  def loss(pl):
    # Returns are computed inside the differentiated function, as a trainer
    # would: they must contribute no gradient.
    g = traced_returns(
        d["r"], d["v"], pl, d["rl"], d["mask"], d["bl"], beta=beta, lam=lam, traces=traces
    )
    return losses.dqo_q_loss(
        pl, d["rl"], d["v"], d["r"], g, d["mask"], beta=beta, lam=lam, normalize=normalize
    )

  g = returns_of(d, beta, lam, traces)
  a = advantages_np(d, g, beta, lam)
  # A_t = y_t - beta sg(l_t), the quantity a trainer logs.
  y = np.asarray(losses.q_targets(d["r"], d["v"], g, d["mask"], lam=lam))
  np.testing.assert_allclose(
      np.where(d["mask"] > 0, y - beta * (d["pl"] - d["rl"]), 0.0), a, rtol=1e-12, atol=1e-12
  )
  if traces is None:
    # Without correction A_t is the soft lambda-advantage G_t - V(s_t).
    np.testing.assert_allclose(a, np.where(d["mask"] > 0, g - d["v"], 0.0), rtol=1e-12, atol=1e-12)

  w = token_weights(LENGTHS, T, normalize)
  np.testing.assert_allclose(jax.grad(loss)(d["pl"]), -2 * beta * a * w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# A tiny parametric policy and value: logits = x @ W_pi, v = x @ W_v.


def tiny_model(seed=7, B=3, T=5, D=4, V=6):
  rng = np.random.default_rng(seed)
  lengths = [2, 5, 0]
  return dict(
      x=rng.normal(size=(B, T, D)),
      targets=rng.integers(0, V, size=(B, T)),
      w_pi=rng.normal(size=(D, V)),
      w_ref=rng.normal(size=(D, V)),
      w_v=rng.normal(size=(D,)),
      bl=-rng.uniform(0.5, 2.5, size=(B, T)),
      r=rng.normal(size=(B, T)),
      lengths=lengths,
      mask=losses.mask_from_lengths(jnp.asarray(lengths), T),
  )


def tiny_losses(m, w_pi, w_v, *, traces, normalize="token", beta=0.3, lam=0.9):
  pl = losses.token_logprobs(m["x"] @ w_pi, m["targets"])
  rl = losses.token_logprobs(m["x"] @ m["w_ref"], m["targets"])
  v = m["x"] @ w_v
  g = traced_returns(m["r"], v, pl, rl, m["mask"], m["bl"], beta=beta, lam=lam, traces=traces)
  l_v = losses.dqo_value_loss(v, g, m["mask"], normalize=normalize)
  l_q = losses.dqo_q_loss(pl, rl, v, m["r"], g, m["mask"], beta=beta, lam=lam, normalize=normalize)
  return l_v, l_q


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("traces", [None, (2.0, 1.0)])
def test_stop_gradients_separate_policy_and_value(traces, normalize):
  m = tiny_model()
  f = functools.partial(tiny_losses, m, traces=traces, normalize=normalize)
  dv_dpi, dv_dv = jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1))(m["w_pi"], m["w_v"])
  dq_dpi, dq_dv = jax.grad(lambda a, b: f(a, b)[1], argnums=(0, 1))(m["w_pi"], m["w_v"])
  # Exactly zero, not small: the returns and the Q target are pure targets.
  np.testing.assert_array_equal(dv_dpi, 0.0)
  np.testing.assert_array_equal(dq_dv, 0.0)
  assert np.linalg.norm(dv_dv) > 1e-3
  assert np.linalg.norm(dq_dpi) > 1e-3


def test_q_gradient_is_advantage_weighted_grad_log_pi():
  """grad_W L_Q = sum_t -2 beta A_t w_t grad_W log pi(a_t|s_t), via a VJP."""
  m = tiny_model()
  beta, lam = 0.3, 0.9
  logp = lambda w: losses.token_logprobs(m["x"] @ w, m["targets"])
  pl = logp(m["w_pi"])
  rl = losses.token_logprobs(m["x"] @ m["w_ref"], m["targets"])
  v = m["x"] @ m["w_v"]
  g = losses.soft_lambda_returns(m["r"], v, pl, rl, m["mask"], beta=beta, lam=lam)
  y = losses.q_targets(m["r"], v, g, m["mask"], lam=lam)
  a = np.where(np.asarray(m["mask"]) > 0, y - beta * (pl - rl), 0.0)
  w = token_weights(m["lengths"], m["x"].shape[1], "token")
  _, vjp = jax.vjp(logp, m["w_pi"])
  (want,) = vjp(jnp.asarray(-2 * beta * a * w))
  got = jax.grad(lambda wp: tiny_losses(m, wp, m["w_v"], traces=None, beta=beta, lam=lam)[1])(
      m["w_pi"]
  )
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------
# Padding.


def test_padding_never_leaks():
  d = random_batch(8, LENGTHS, T)
  pad = d["mask"] == 0
  rng = np.random.default_rng(9)
  garbage = rng.choice([np.nan, np.inf, -np.inf, 1e30, -7.0], size=pad.shape)
  dirty = dict(d)
  for k in ("r", "v", "pl", "rl", "bl"):
    dirty[k] = np.where(pad, garbage, d[k])
  beta, lam = 0.4, 0.6

  def everything(e):
    out = {
        "next_values": losses.next_values(e["v"], e["mask"]),
        "nll": losses.sequence_nll(e["pl"], e["mask"]),
    }
    for traces in (None, (2.0, 1.0)):
      g = returns_of(e, beta, lam, traces)
      key = str(traces)
      out["G" + key] = g
      out["y" + key] = losses.q_targets(e["r"], e["v"], g, e["mask"], lam=lam)
      for norm in ("token", "sequence"):
        q = lambda pl, v: losses.dqo_q_loss(
            pl, e["rl"], v, e["r"], g, e["mask"], beta=beta, lam=lam, normalize=norm
        )
        vl = lambda v: losses.dqo_value_loss(v, g, e["mask"], normalize=norm)
        out["LQ" + key + norm] = q(e["pl"], e["v"])
        out["LV" + key + norm] = vl(e["v"])
        out["dLQ" + key + norm] = jax.grad(q)(e["pl"], e["v"])
        out["dLV" + key + norm] = jax.grad(vl)(e["v"])
    return out

  clean, got = everything(d), everything(dirty)
  assert clean.keys() == got.keys()
  for k in clean:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(clean[k]), err_msg=k)
  for k in clean:
    if k.startswith(("G", "y", "dL", "next")):
      np.testing.assert_array_equal(np.asarray(got[k])[pad], 0.0, err_msg=k)


def test_next_values_and_terminal_value():
  v = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
  mask = losses.mask_from_lengths(jnp.array([4, 2, 0]), 4)
  np.testing.assert_array_equal(
      losses.next_values(v, mask),
      [[2.0, 3.0, 4.0, 0.0], [6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
  )


# ----------------------------------------------------------------------------
# Small pieces.


def test_mask_and_outcome_rewards_from_lengths():
  lengths = jnp.array([0, 1, 3, 4])
  np.testing.assert_array_equal(
      losses.mask_from_lengths(lengths, 4), [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
  )
  r = losses.place_outcome_rewards(jnp.array([5.0, -1.0, 2.0, 3.0]), lengths, 4)
  np.testing.assert_array_equal(r, [[0, 0, 0, 0], [-1, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3]])


def test_token_logprobs():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 7)) * 3
  targets = rng.integers(0, 7, size=(2, 3))
  want = np.take_along_axis(
      np.asarray(jax.nn.log_softmax(logits, axis=-1)), targets[..., None], axis=-1
  )[..., 0]
  got = losses.token_logprobs(logits, targets)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got16 = losses.token_logprobs(bf16, targets)
  assert got16.dtype == jnp.float32
  want16 = losses.token_logprobs(bf16.astype(jnp.float64), targets)
  np.testing.assert_allclose(got16, want16, rtol=1e-5, atol=1e-5)


def test_sequence_nll_and_normalizations():
  logprobs = np.array([[-1.0, -3.0, -9.0], [-2.0, -9.0, -9.0], [-9.0, -9.0, -9.0]])
  mask = losses.mask_from_lengths(jnp.array([2, 1, 0]), 3)
  # token: (1 + 3 + 2) / 3; sequence: mean(2, 2) over the two nonempty rows.
  np.testing.assert_allclose(losses.sequence_nll(logprobs, mask), 2.0)
  np.testing.assert_allclose(losses.sequence_nll(logprobs, mask, normalize="sequence"), 2.0)
  mask = losses.mask_from_lengths(jnp.array([1, 2, 0]), 3)
  np.testing.assert_allclose(losses.sequence_nll(logprobs, mask), 12 / 3)
  np.testing.assert_allclose(
      losses.sequence_nll(logprobs, mask, normalize="sequence"), (1 + 5.5) / 2
  )


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_empty_batch_gives_zero_not_nan(normalize):
  v = np.ones((2, 3))
  mask = np.zeros((2, 3))
  assert float(losses.dqo_value_loss(v, 2 * v, mask, normalize=normalize)) == 0
  assert float(losses.dqo_q_loss(v, v, v, v, v, mask, beta=0.1, lam=0.5, normalize=normalize)) == 0
  assert float(losses.sequence_nll(v, mask, normalize=normalize)) == 0


def test_invalid_arguments_raise():
  x = np.zeros((1, 2))
  with pytest.raises(ValueError, match="c_max"):
    losses.soft_lambda_returns(
        x, x, x, x, x + 1, beta=0.1, lam=0.5, behaviour_logprobs=x, rho_max=1.0, c_max=2.0
    )
  with pytest.raises(ValueError, match="normalize"):
    losses.dqo_value_loss(x, x, x, normalize="batch")


# ----------------------------------------------------------------------------
# Transformations.


def test_jit_matches_eager():
  d = random_batch(11, LENGTHS, T)
  beta, lam = 0.3, 0.8
  calls = {
      "returns": lambda e: losses.soft_lambda_returns(
          e["r"],
          e["v"],
          e["pl"],
          e["rl"],
          e["mask"],
          beta=beta,
          lam=lam,
          behaviour_logprobs=e["bl"],
          rho_max=2.0,
          c_max=1.0,
      ),
      "q": lambda e: losses.dqo_q_loss(
          e["pl"], e["rl"], e["v"], e["r"], e["v"], e["mask"], beta=beta, lam=lam
      ),
      "v": lambda e: losses.dqo_value_loss(e["v"], e["r"], e["mask"], normalize="sequence"),
      "nll": lambda e: losses.sequence_nll(e["pl"], e["mask"]),
      "next": lambda e: losses.next_values(e["v"], e["mask"]),
      "rewards": lambda e: losses.place_outcome_rewards(e["r"][:, 0], e["lengths"], T),
  }
  for name, fn in calls.items():
    np.testing.assert_allclose(jax.jit(fn)(d), fn(d), rtol=1e-12, atol=1e-12, err_msg=name)


def test_vmap_over_stacked_batches():
  ds = [random_batch(20 + i, LENGTHS, T) for i in range(3)]
  stacked = {k: np.stack([d[k] for d in ds]) for k in ("r", "v", "pl", "rl", "bl", "mask")}
  lams = np.array([0.0, 0.5, 1.0])

  def per_batch(e, lam):
    g = losses.soft_lambda_returns(
        e["r"],
        e["v"],
        e["pl"],
        e["rl"],
        e["mask"],
        beta=0.3,
        lam=lam,
        behaviour_logprobs=e["bl"],
        rho_max=2.0,
        c_max=1.0,
    )
    return (
        g,
        losses.dqo_q_loss(e["pl"], e["rl"], e["v"], e["r"], g, e["mask"], beta=0.3, lam=lam),
        losses.dqo_value_loss(e["v"], g, e["mask"]),
    )

  batched = jax.jit(jax.vmap(per_batch))(stacked, lams)
  for i, d in enumerate(ds):
    single = per_batch(d, lams[i])
    for got, want in zip(batched, single):
      np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Process supervision: potential-based shaping.


@_settings
@given(batches(), st.floats(0.0, 3.0))
def test_potential_shaping_matches_reference_and_telescopes(d, alpha):
  mask = losses.mask_from_lengths(jnp.asarray(d["lengths"]), d["T"])
  phi = d["v"]  # any [B, T] array serves as potentials; padding holds garbage
  got = np.asarray(losses.potential_shaping(phi, mask, alpha=alpha))
  assert got.dtype == np.float64
  for b, length in enumerate(d["lengths"]):
    p = [float(x) for x in phi[b][:length]] + [0.0]  # Phi(terminal) = 0
    want = [alpha * (p[t + 1] - p[t]) for t in range(length)] + [0.0] * (d["T"] - length)
    np.testing.assert_allclose(got[b], want, rtol=TOL, atol=TOL)
    if length:  # the shaping of a response sums to -alpha * Phi(s_0)
      np.testing.assert_allclose(got[b].sum(), -alpha * p[0], rtol=1e-7, atol=1e-7)


def test_shaping_leaves_the_monte_carlo_advantage_at_phi_when_v_is_zero():
  """lambda = 1, V = 0: G_t = R - alpha Phi(s_t) - beta sum_{k>=t} l_k, the shaped return."""
  phi = jnp.array([[0.2, 0.2, 0.6, 0.6, 0.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
  r = losses.place_outcome_rewards(jnp.array([1.0]), jnp.array([4]), 5)
  r = r + losses.potential_shaping(phi, mask, alpha=1.0)
  zeros = jnp.zeros((1, 5))
  g = losses.soft_lambda_returns(r, zeros, zeros, zeros, mask, beta=0.1, lam=1.0)
  np.testing.assert_allclose(np.asarray(g[0]), [0.8, 0.8, 0.4, 0.4, 0.0], atol=1e-12)
