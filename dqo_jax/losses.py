"""Direct Q-function Optimization (DQO) targets and losses.

Pure functions over padded ``[batch, time]`` arrays, in the style of rlax. The
method and every equation below are defined in ``docs/method.md``.

Conventions shared by every function here:

* ``mask`` is 1 (or True) on valid response tokens and 0 on padding. Padding is
  on the right, so each row of ``mask`` is a prefix of ones; build it with
  :func:`mask_from_lengths`, never from ``tokens != pad_id`` (pad may equal EOS).
* ``values[:, t]`` is V(s_t), read at the position whose logits predict a_t.
* The state after the last valid token is terminal: V(s_{T+1}) := 0 and
  G_{T+1} := 0. The value the model computes past the mask is never used.
* Padded entries of every input are replaced (``jnp.where``) before any
  arithmetic, so garbage there (even NaN/inf) reaches neither outputs nor
  gradients.
* Arithmetic runs in at least float32 (bf16 inputs are upcast); float64 inputs
  stay float64 when ``jax_enable_x64`` is on.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

_NORMALIZATIONS = ("token", "sequence")


# ----------------------------------------------------------------------------
# Helpers.


def _compute_dtype(*arrays: Array) -> jnp.dtype:
  """The common float dtype of `arrays`, at least float32."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _valid(mask: Array) -> Array:
  return jnp.asarray(mask).astype(bool)


def _masked(x: Array, valid: Array, dtype) -> Array:
  # `where`, not a multiply: 0 * NaN is NaN, and the gradient of a multiply
  # would still flow through padded entries.
  return jnp.where(valid, x.astype(dtype), jnp.zeros((), dtype))


def _shift_left(x: Array) -> Array:
  """x[:, t + 1], with 0 in the last column. [B, T] -> [B, T]."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def _check_normalize(normalize: str) -> None:
  if normalize not in _NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}.")


def masked_mean(x: Array, mask: Array, *, normalize: str = "token") -> Array:
  """Mean of `x` over valid tokens.

  Args:
    x: [B, T] per-token quantity.
    mask: [B, T] 1 on valid tokens.
    normalize: "token": sum over all valid tokens / number of valid tokens in
      the batch. "sequence": per-sequence mean over its valid tokens, then the
      mean over sequences that have at least one valid token.

  Returns:
    scalar; 0 when the batch has no valid token.
  """
  chex.assert_rank([x, mask], 2)
  chex.assert_equal_shape([x, mask])
  _check_normalize(normalize)
  valid = _valid(mask)
  dtype = _compute_dtype(x)
  x = _masked(x, valid, dtype)
  counts = jnp.sum(valid, axis=1).astype(dtype)  # [B]
  if normalize == "token":
    # mean = sum_{b,t} m x / max(1, sum_{b,t} m)
    return jnp.sum(x) / jnp.maximum(jnp.sum(counts), 1.0)
  # mean = sum_b [n_b > 0] (sum_t m x / n_b) / max(1, #{b: n_b > 0})
  per_seq = jnp.sum(x, axis=1) / jnp.maximum(counts, 1.0)
  has_tokens = counts > 0
  return jnp.sum(per_seq) / jnp.maximum(jnp.sum(has_tokens).astype(dtype), 1.0)


# ----------------------------------------------------------------------------
# Masks and rewards from lengths.


def mask_from_lengths(lengths: Array, T: int) -> Array:
  """Right-padded response mask.

  Args:
    lengths: [B] int, number of valid tokens per row (EOS included).
    T: static padded length.

  Returns:
    [B, T] float32, mask[b, t] = 1 if t < lengths[b] else 0.
  """
  chex.assert_rank(lengths, 1)
  # m[b, t] = [t < len_b]
  return (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.float32)


def place_outcome_rewards(outcome: Array, lengths: Array, T: int) -> Array:
  """Puts each sequence's outcome reward on its last valid token.

  Rows with length 0 are all zero. Lengths must be <= T: a row longer than T
  gets no reward here, and the caller must drop such samples rather than
  truncate them into a terminal state.

  Args:
    outcome: [B] float, outcome reward R(x, y).
    lengths: [B] int, number of valid tokens per row.
    T: static padded length.

  Returns:
    [B, T], r[b, t] = outcome[b] if t == lengths[b] - 1 else 0.
  """
  chex.assert_rank([outcome, lengths], 1)
  chex.assert_equal_shape([outcome, lengths])
  dtype = _compute_dtype(outcome)
  # r[b, t] = R_b [t = len_b - 1]
  at_last = jnp.arange(T)[None, :] == (lengths[:, None] - 1)
  return jnp.where(at_last, outcome[:, None].astype(dtype), jnp.zeros((), dtype))


# ----------------------------------------------------------------------------
# Log-probabilities.


def token_logprobs(logits: Array, targets: Array) -> Array:
  """Log-probability of each target token.

  The caller aligns the inputs: logits[:, t] is the distribution that predicts
  targets[:, t].

  Args:
    logits: [B, T, V] any float dtype.
    targets: [B, T] int in [0, V).

  Returns:
    [B, T] float32 (float64 for float64 logits), log_softmax(logits)[targets].
  """
  chex.assert_rank(logits, 3)
  chex.assert_rank(targets, 2)
  chex.assert_equal_shape_prefix([logits, targets], 2)
  # Upcast first: logsumexp over a large vocabulary in bf16 loses the answer.
  logits = logits.astype(_compute_dtype(logits))
  # log pi(a) = z_a - logsumexp(z)
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def sequence_nll(logprobs: Array, mask: Array, *, normalize: str = "token") -> Array:
  """SFT negative log-likelihood over valid tokens.

  Args:
    logprobs: [B, T] log pi(a_t|s_t).
    mask: [B, T] 1 on valid tokens.
    normalize: "token" or "sequence", as in :func:`masked_mean`.

  Returns:
    scalar, -mean_t log pi(a_t|s_t).
  """
  chex.assert_rank([logprobs, mask], 2)
  chex.assert_equal_shape([logprobs, mask])
  # L = -E_t[log pi(a_t|s_t)]
  return -masked_mean(logprobs, mask, normalize=normalize)


# ----------------------------------------------------------------------------
# Targets.


def next_values(values: Array, mask: Array) -> Array:
  """V(s_{t+1}), zero at and after the last valid token.

  Args:
    values: [B, T] V(s_t).
    mask: [B, T] 1 on valid tokens (a prefix of ones per row).

  Returns:
    [B, T], values[:, t + 1] where tokens t and t + 1 are both valid, else 0.
  """
  chex.assert_rank([values, mask], 2)
  chex.assert_equal_shape([values, mask])
  valid = _valid(mask)
  v = _masked(values, valid, _compute_dtype(values))
  # V(s_{t+1}) = m_{t+1} V[t+1]; V(terminal) = 0, whatever the model computed.
  return jnp.where(valid, _shift_left(v), 0.0)


def potential_shaping(potentials: Array, mask: Array, *, alpha: float) -> Array:
  """Potential-based shaping rewards (Ng, Harada and Russell 1999) from Phi(s_t).

    F_t = alpha * (Phi(s_{t+1}) - Phi(s_t)),   Phi(terminal) = 0

  The terms telescope to -alpha * Phi(s_0) per response, so the optimal policy is unchanged.

  Args:
    potentials: [B, T] Phi(s_t), e.g. the Monte-Carlo success rate of the prefix before a_t.
    mask: [B, T] 1 on valid tokens (a prefix of ones per row).
    alpha: shaping weight.

  Returns:
    [B, T] F_t, 0 on padding; add it to r_t.
  """
  chex.assert_rank([potentials, mask], 2)
  chex.assert_equal_shape([potentials, mask])
  valid = _valid(mask)
  phi = _masked(potentials, valid, _compute_dtype(potentials))
  return jnp.where(valid, alpha * (next_values(phi, valid) - phi), 0.0)


def soft_lambda_returns(
    rewards: Array,
    values: Array,
    policy_logprobs: Array,
    ref_logprobs: Array,
    mask: Array,
    *,
    beta: float,
    lam: float,
    behaviour_logprobs: Optional[Array] = None,
    rho_max: float = 1.0,
    c_max: float = 1.0,
    impl: str = "scan",
) -> Array:
  """Soft lambda-returns G_t, optionally with truncated importance traces.

  With behaviour_logprobs=None (the default, rho = c = 1):
    G_t = rt~_t + (1 - lam) V(s_{t+1}) + lam G_{t+1},   rt~_t = r_t - beta l_t.
  With behaviour_logprobs (V-trace):
    G_t = V(s_t) + rho_t delta_t + lam c_t (G_{t+1} - V(s_{t+1})),
    delta_t = rt~_t + V(s_{t+1}) - V(s_t),
    rho_t = min(rho_max, pi/mu), c_t = min(c_max, pi/mu).
  In both, l_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t), V(s_{T+1}) = 0 and
  G_{T+1} = 0 after the last valid token. Everything is a target: gradients do
  not flow through the result.

  Args:
    rewards: [B, T] r_t (outcome reward on the last valid token, plus any
      process/shaping rewards).
    values: [B, T] V(s_t).
    policy_logprobs: [B, T] log pi_theta(a_t|s_t).
    ref_logprobs: [B, T] log pi_ref(a_t|s_t).
    mask: [B, T] 1 on valid tokens (a prefix of ones per row).
    beta: KL coefficient.
    lam: lambda in [0, 1].
    behaviour_logprobs: optional [B, T] log mu(a_t|s_t); None turns importance
      correction off.
    rho_max: static float, truncation of rho_t.
    c_max: static float, truncation of c_t; must be <= rho_max.
    impl: static, how the recursion is evaluated: "scan" (default) or "associative"; see
      :func:`reverse_linear_recurrence`.

  Returns:
    [B, T] G_t, 0 where mask is 0.
  """
  if c_max > rho_max:
    raise ValueError(f"c_max ({c_max}) must not exceed rho_max ({rho_max}) (V-trace).")
  arrays = [rewards, values, policy_logprobs, ref_logprobs, mask]
  if behaviour_logprobs is not None:
    arrays.append(behaviour_logprobs)
  chex.assert_rank(arrays, 2)
  chex.assert_equal_shape(arrays)

  valid = _valid(mask)
  dtype = _compute_dtype(rewards, values, policy_logprobs, ref_logprobs)
  prep = lambda x: _masked(jax.lax.stop_gradient(x), valid, dtype)
  r = prep(rewards)
  v = prep(values)
  log_pi = prep(policy_logprobs)
  l = log_pi - prep(ref_logprobs)
  v_next = next_values(v, valid)
  beta = jnp.asarray(jax.lax.stop_gradient(beta), dtype)
  lam = jnp.asarray(jax.lax.stop_gradient(lam), dtype)
  # rt~_t = r_t - beta sg(l_t)
  soft_r = r - beta * l

  # Both forms are G_t = a_t + k_t G_{t+1}; a padded token gets a_t = k_t = 0, so G_t = 0 there
  # and the recursion restarts at each row's last valid token.
  if behaviour_logprobs is None:
    # G_t = rt~_t + (1 - lam) V(s_{t+1}) + lam G_{t+1}
    a = soft_r + (1.0 - lam) * v_next
    k = jnp.broadcast_to(lam, a.shape)
  else:
    # ratio_t = exp(sg(log pi - log mu)); padded ratios are never used.
    ratio = jnp.exp(log_pi - prep(behaviour_logprobs))
    rho = jnp.minimum(jnp.asarray(rho_max, dtype), ratio)
    c = jnp.minimum(jnp.asarray(c_max, dtype), ratio)
    # G_t = V_t + rho_t delta_t + lam c_t (G_{t+1} - V(s_{t+1})),  delta_t = rt~_t + V_{t+1} - V_t
    a = v + rho * (soft_r + v_next - v) - lam * c * v_next
    k = lam * c
  zero = jnp.zeros((), dtype)
  a, k = jnp.where(valid, a, zero), jnp.where(valid, k, zero)
  return jax.lax.stop_gradient(reverse_linear_recurrence(k, a, impl=impl))


RETURN_IMPLS = ("scan", "associative")


def reverse_linear_recurrence(k: Array, a: Array, *, impl: str = "scan") -> Array:
  """G_t = a_t + k_t G_{t+1} along axis 1, with G_T = 0 after the last column.

  "scan" steps through time with `lax.scan` (T sequential steps); "associative" composes the
  affine maps g -> a_t + k_t g with `lax.associative_scan` (O(log T) depth, about twice the
  arithmetic and many more kernels). They agree to float round-off, as long as products of
  k_t over a row stay finite (always with c_max <= 1). `benchmarks/returns.py` times both: on
  CPU the scan is 1.5-4x faster at T = 256..4096, so it is the default; the log-depth form is
  there for accelerators, where a long sequential loop is the slow part.

  Args:
    k: [B, T] multiplier k_t.
    a: [B, T] offset a_t.
    impl: "scan" or "associative".

  Returns:
    [B, T] G_t.
  """
  chex.assert_rank([k, a], 2)
  chex.assert_equal_shape([k, a])
  if impl == "scan":

    def step(g_next, xs):
      k_t, a_t = xs
      g = a_t + k_t * g_next
      return g, g

    _, g = jax.lax.scan(step, jnp.zeros(a.shape[:1], a.dtype), (k.T, a.T), reverse=True)
    return g.T
  if impl == "associative":

    def compose(later, earlier):
      # `later` covers tokens after `earlier`'s: earlier(later(g)) = a_e + k_e (a_l + k_l g).
      k_l, a_l = later
      k_e, a_e = earlier
      return k_e * k_l, a_e + k_e * a_l

    # reverse=True folds from the last column, so `compose` receives the suffix first.
    _, g = jax.lax.associative_scan(compose, (k, a), reverse=True, axis=1)
    return g
  raise ValueError(f"impl must be one of {RETURN_IMPLS}, got {impl!r}.")


def q_targets(
    rewards: Array,
    values: Array,
    returns: Array,
    mask: Array,
    *,
    lam: float,
) -> Array:
  """Target y_t that beta * l_t regresses onto in the Q loss.

    y_t = r_t + (1 - lam) V(s_{t+1}) + lam G_{t+1} - V(s_t)   (all sg)

  With V(s_{T+1}) = G_{T+1} = 0 after the last valid token. The soft
  lambda-advantage for logging is A_t = y_t - beta * sg(l_t)
  (= G_t - V(s_t) without importance correction).

  Args:
    rewards: [B, T] r_t.
    values: [B, T] V(s_t).
    returns: [B, T] G_t from :func:`soft_lambda_returns`.
    mask: [B, T] 1 on valid tokens (a prefix of ones per row).
    lam: lambda in [0, 1].

  Returns:
    [B, T] y_t, 0 where mask is 0.
  """
  chex.assert_rank([rewards, values, returns, mask], 2)
  chex.assert_equal_shape([rewards, values, returns, mask])
  valid = _valid(mask)
  dtype = _compute_dtype(rewards, values, returns)
  prep = lambda x: _masked(jax.lax.stop_gradient(x), valid, dtype)
  r = prep(rewards)
  v = prep(values)
  g = prep(returns)
  v_next = next_values(v, valid)
  g_next = next_values(g, valid)
  lam = jnp.asarray(jax.lax.stop_gradient(lam), dtype)
  # y_t = r_t + (1 - lam) V(s_{t+1}) + lam G_{t+1} - V(s_t)
  y = r + (1.0 - lam) * v_next + lam * g_next - v
  return jnp.where(valid, y, 0.0)


# ----------------------------------------------------------------------------
# Losses.


def dqo_value_loss(
    values: Array,
    returns: Array,
    mask: Array,
    *,
    normalize: str = "token",
) -> Array:
  """Value regression onto the soft lambda-returns.

    L_V = E_t[(V(s_t) - sg(G_t))^2]

  Args:
    values: [B, T] V_phi(s_t) (differentiated).
    returns: [B, T] G_t (stopped).
    mask: [B, T] 1 on valid tokens.
    normalize: "token" or "sequence", as in :func:`masked_mean`.

  Returns:
    scalar loss.
  """
  chex.assert_rank([values, returns, mask], 2)
  chex.assert_equal_shape([values, returns, mask])
  valid = _valid(mask)
  dtype = _compute_dtype(values, returns)
  v = _masked(values, valid, dtype)
  g = _masked(jax.lax.stop_gradient(returns), valid, dtype)
  # (V_t - sg(G_t))^2
  return masked_mean(jnp.square(v - g), valid, normalize=normalize)


def dqo_q_loss(
    policy_logprobs: Array,
    ref_logprobs: Array,
    values: Array,
    rewards: Array,
    returns: Array,
    mask: Array,
    *,
    beta: float,
    lam: float,
    normalize: str = "token",
) -> Array:
  """Q-function (policy) regression: beta * l_t + V(s_t) onto its lambda-target.

    L_Q = E_t[(beta l_t - y_t)^2],  l_t = log pi_theta - log pi_ref,
    y_t = r_t + (1 - lam) V(s_{t+1}) + lam G_{t+1} - V(s_t)   (sg)
    grad L_Q,t = -2 beta A_t grad log pi_theta,  A_t = y_t - beta l_t.

  Args:
    policy_logprobs: [B, T] log pi_theta(a_t|s_t) (differentiated).
    ref_logprobs: [B, T] log pi_ref(a_t|s_t) (stopped).
    values: [B, T] V(s_t) (stopped).
    rewards: [B, T] r_t.
    returns: [B, T] G_t from :func:`soft_lambda_returns` (stopped).
    mask: [B, T] 1 on valid tokens (a prefix of ones per row).
    beta: KL coefficient.
    lam: lambda used for `returns`.
    normalize: "token" or "sequence", as in :func:`masked_mean`.

  Returns:
    scalar loss.
  """
  chex.assert_rank([policy_logprobs, ref_logprobs, values, rewards, returns, mask], 2)
  chex.assert_equal_shape([policy_logprobs, ref_logprobs, values, rewards, returns, mask])
  valid = _valid(mask)
  y = q_targets(rewards, values, returns, valid, lam=lam)
  dtype = _compute_dtype(policy_logprobs, ref_logprobs, y)
  # l_t is deliberately not stopped: it is what the loss trains.
  l = _masked(policy_logprobs, valid, dtype) - _masked(
      jax.lax.stop_gradient(ref_logprobs), valid, dtype
  )
  beta = jnp.asarray(jax.lax.stop_gradient(beta), dtype)
  # (beta l_t - y_t)^2
  return masked_mean(jnp.square(beta * l - y), valid, normalize=normalize)
