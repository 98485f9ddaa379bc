"""Sequence-level (bandit) baseline losses: DPO, KTO and DRO-V.

Pure functions in the style of rlax, defined in ``docs/method.md``
("The baselines"). Each response y is scored by its sequence log-ratio
l(y) = sum_t (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)).

Conventions, shared with :mod:`dqo_jax.losses`:

* Masks (``mask``, ``pair_mask``, ``sample_mask``) are 1 (or True) on real
  entries and 0 on padding; ``None`` means every entry is real.
* Padded entries of every input are replaced (``jnp.where``) before any
  arithmetic, so garbage there (even NaN/inf) reaches neither outputs nor
  gradients.
* Means are over valid entries only, and are 0 when there is none.
* Arithmetic runs in at least float32; float64 inputs stay float64 when
  ``jax_enable_x64`` is on.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

# lambda_D n_D / (lambda_U n_U) must lie in this range (docs/method.md, "The baselines").
_KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------
# Helpers.


def _compute_dtype(*arrays: Array) -> jnp.dtype:
  """The common float dtype of `arrays`, at least float32."""
  return jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in arrays))


def _valid(mask: Optional[Array], like: Array) -> Array:
  """`mask` as bool, all True when None."""
  if mask is None:
    return jnp.ones(jnp.shape(like), bool)
  chex.assert_equal_shape([mask, like])
  return jnp.asarray(mask).astype(bool)


def _masked(x: Array, valid: Array, dtype) -> Array:
  # `where`, not a multiply: 0 * NaN is NaN, and the gradient of a multiply
  # would still flow through padded entries.
  return jnp.where(valid, jnp.asarray(x).astype(dtype), jnp.zeros((), dtype))


def _mean(x: Array, valid: Array) -> Array:
  """Mean of `x` over `valid` entries; 0 when none. `x` already masked."""
  # mean = sum m x / max(1, sum m)
  return jnp.sum(x) / jnp.maximum(jnp.sum(valid).astype(x.dtype), 1.0)


def _scalar(x, dtype) -> Array:
  """A hyperparameter as a stopped scalar of `dtype`."""
  return jnp.asarray(jax.lax.stop_gradient(x), dtype)


# ----------------------------------------------------------------------------
# Sequence log-ratio.


def sequence_logratio(policy_logprobs: Array, ref_logprobs: Array, mask: Array) -> Array:
  """Sequence log-ratio of each response.

    l(y) = sum_t m_t (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t))

  Args:
    policy_logprobs: [B, T] log pi_theta(a_t|s_t) (differentiated).
    ref_logprobs: [B, T] log pi_ref(a_t|s_t) (stopped: the reference is frozen).
    mask: [B, T] 1 on valid tokens.

  Returns:
    [B] l(y).
  """
  chex.assert_rank([policy_logprobs, ref_logprobs, mask], 2)
  chex.assert_equal_shape([policy_logprobs, ref_logprobs, mask])
  valid = _valid(mask, mask)
  dtype = _compute_dtype(policy_logprobs, ref_logprobs)
  pl = _masked(policy_logprobs, valid, dtype)
  rl = _masked(jax.lax.stop_gradient(ref_logprobs), valid, dtype)
  return jnp.sum(pl - rl, axis=1)


# ----------------------------------------------------------------------------
# DPO.


def dpo_loss(
    chosen_logratio: Array,
    rejected_logratio: Array,
    *,
    beta: float,
    pair_mask: Optional[Array] = None,
) -> tuple[Array, dict]:
  """DPO loss over (correct, incorrect) response pairs to one prompt.

    L = E_pairs[-log sigmoid(beta (l(y_w) - l(y_l)))]

  Args:
    chosen_logratio: [P] l(y_w) of the preferred (correct) responses.
    rejected_logratio: [P] l(y_l) of the rejected (incorrect) responses.
    beta: KL coefficient.
    pair_mask: [P] 1 on real pairs, 0 on padding pairs; None for all real.

  Returns:
    (scalar loss, metrics): reward_margin_mean (beta (l_w - l_l)), preference_accuracy
    (fraction with l_w > l_l), chosen_logratio_mean, rejected_logratio_mean,
    all over real pairs.
  """
  chex.assert_rank([chosen_logratio, rejected_logratio], 1)
  chex.assert_equal_shape([chosen_logratio, rejected_logratio])
  valid = _valid(pair_mask, chosen_logratio)
  dtype = _compute_dtype(chosen_logratio, rejected_logratio)
  lw = _masked(chosen_logratio, valid, dtype)
  ll = _masked(rejected_logratio, valid, dtype)
  beta = _scalar(beta, dtype)
  margin = beta * (lw - ll)
  # -log sigmoid(beta (l_w - l_l)); log_sigmoid does not overflow for large margins.
  per_pair = _masked(-jax.nn.log_sigmoid(margin), valid, dtype)
  metrics = {
      "reward_margin_mean": _mean(margin, valid),
      "preference_accuracy": _mean(_masked(lw > ll, valid, dtype), valid),
      "chosen_logratio_mean": _mean(lw, valid),
      "rejected_logratio_mean": _mean(ll, valid),
  }
  return _mean(per_pair, valid), metrics


# ----------------------------------------------------------------------------
# KTO.


def kto_z0(mismatched_logratio: Array, *, sample_mask: Optional[Array] = None) -> Array:
  """KTO reference point, not back-propagated.

    z0 = sg(max(0, mean_i l(y'_i)))

  The caller builds the mismatched pairs: y'_i is the response of a different
  example scored under prompt x_i.

  Args:
    mismatched_logratio: [B] l(y'_i) under prompt x_i.
    sample_mask: [B] 1 on real samples; None for all real.

  Returns:
    scalar z0; 0 when there is no real sample.
  """
  chex.assert_rank(mismatched_logratio, 1)
  valid = _valid(sample_mask, mismatched_logratio)
  dtype = _compute_dtype(mismatched_logratio)
  l = _masked(jax.lax.stop_gradient(mismatched_logratio), valid, dtype)
  return jax.lax.stop_gradient(jnp.maximum(_mean(l, valid), 0.0))


def kto_loss(
    logratio: Array,
    correct: Array,
    z0: Array,
    *,
    beta: float,
    lambda_d: float,
    lambda_u: float,
    sample_mask: Optional[Array] = None,
) -> tuple[Array, dict]:
  """KTO loss with correct responses desirable and incorrect undesirable.

    v = lambda_D sigmoid(beta (l - z0))  if correct,
        lambda_U sigmoid(beta (z0 - l))  otherwise;
    L = E[lambda_y - v]

  Args:
    logratio: [B] l(y) (differentiated).
    correct: [B] bool, whether y is correct (desirable).
    z0: scalar reference point from :func:`kto_z0` (stopped again here).
    beta: KL coefficient.
    lambda_d: weight of desirable samples, see :func:`kto_lambdas`.
    lambda_u: weight of undesirable samples.
    sample_mask: [B] 1 on real samples; None for all real.

  Returns:
    (scalar loss, metrics): z0, chosen_logratio_mean and
    rejected_logratio_mean (over real correct / incorrect samples, 0 if none).
  """
  chex.assert_rank([logratio, correct], 1)
  chex.assert_equal_shape([logratio, correct])
  chex.assert_rank(z0, 0)
  valid = _valid(sample_mask, logratio)
  dtype = _compute_dtype(logratio)
  l = _masked(logratio, valid, dtype)
  correct = jnp.asarray(correct).astype(bool)
  z0 = _scalar(z0, dtype)
  beta = _scalar(beta, dtype)
  lam = jnp.where(correct, _scalar(lambda_d, dtype), _scalar(lambda_u, dtype))
  # Sign of beta (l - z0): + for desirable, - for undesirable.
  z = jnp.where(correct, 1.0, -1.0).astype(dtype) * beta * (l - z0)
  # lambda_y - lambda_y sigmoid(z) = lambda_y sigmoid(-z); the right side keeps
  # precision when sigmoid(z) is close to 1.
  per_sample = _masked(lam * jax.nn.sigmoid(-z), valid, dtype)
  desirable, undesirable = valid & correct, valid & ~correct
  metrics = {
      "z0": z0,
      "chosen_logratio_mean": _mean(_masked(l, desirable, dtype), desirable),
      "rejected_logratio_mean": _mean(_masked(l, undesirable, dtype), undesirable),
  }
  return _mean(per_sample, valid), metrics


def kto_lambdas(
    n_desirable: int, n_undesirable: int, *, target_ratio: float = 1.0
) -> tuple[float, float]:
  """KTO weights (lambda_D, lambda_U) for a dataset's class counts.

  lambda_U = 1 and lambda_D = r n_U / n_D, where r = lambda_D n_D / (lambda_U n_U)
  is `target_ratio` clipped to [1, 4/3] (docs/method.md). With a class absent
  the ratio is undefined and the weights are (1.0, 1.0).

  Args:
    n_desirable: number of desirable (correct) samples n_D >= 0.
    n_undesirable: number of undesirable (incorrect) samples n_U >= 0.
    target_ratio: requested lambda_D n_D / (lambda_U n_U).

  Returns:
    (lambda_d, lambda_u) as Python floats.
  """
  if n_desirable < 0 or n_undesirable < 0:
    raise ValueError(f"counts must be >= 0, got {n_desirable=} {n_undesirable=}.")
  if n_desirable == 0 or n_undesirable == 0:
    return 1.0, 1.0
  lo, hi = _KTO_RATIO_RANGE
  ratio = min(max(float(target_ratio), lo), hi)
  return ratio * n_undesirable / n_desirable, 1.0


# ----------------------------------------------------------------------------
# DRO-V (Richemond et al. 2024, arXiv 2405.19107).


def _dro_half_square(logratio, reward, prompt_value, beta, sample_mask) -> Array:
  """E[1/2 (R - V(x) - beta l(y))^2]; the callers choose what is stopped."""
  chex.assert_rank([logratio, reward, prompt_value], 1)
  chex.assert_equal_shape([logratio, reward, prompt_value])
  valid = _valid(sample_mask, logratio)
  dtype = _compute_dtype(logratio, reward, prompt_value)
  l = _masked(logratio, valid, dtype)
  r = _masked(jax.lax.stop_gradient(reward), valid, dtype)
  v = _masked(prompt_value, valid, dtype)
  # 1/2 (R - V(x) - beta l(y))^2, zero on padding since every term is.
  return _mean(0.5 * jnp.square(r - v - _scalar(beta, dtype) * l), valid)


def dro_policy_loss(
    logratio: Array,
    reward: Array,
    prompt_value: Array,
    *,
    beta: float,
    sample_mask: Optional[Array] = None,
) -> Array:
  """DRO-V policy loss; the prompt value is stopped.

    L_pi = E[1/2 (R - sg(V(x)) - beta l(y))^2]
    grad L_pi = E[-beta (R - V(x) - beta l(y)) grad l(y)]

  Args:
    logratio: [B] l(y) (differentiated).
    reward: [B] R(x, y).
    prompt_value: [B] V(x) of each sample's prompt (stopped).
    beta: KL coefficient.
    sample_mask: [B] 1 on real samples; None for all real.

  Returns:
    scalar loss.
  """
  return _dro_half_square(logratio, reward, jax.lax.stop_gradient(prompt_value), beta, sample_mask)


def dro_value_loss(
    logratio: Array,
    reward: Array,
    prompt_value: Array,
    *,
    beta: float,
    sample_mask: Optional[Array] = None,
) -> Array:
  """DRO-V value loss; the policy is stopped.

    L_V = E[1/2 (R - V(x) - beta sg(l(y)))^2]

  Args:
    logratio: [B] l(y) (stopped).
    reward: [B] R(x, y).
    prompt_value: [B] V(x) of each sample's prompt (differentiated).
    beta: KL coefficient.
    sample_mask: [B] 1 on real samples; None for all real.

  Returns:
    scalar loss.
  """
  return _dro_half_square(jax.lax.stop_gradient(logratio), reward, prompt_value, beta, sample_mask)
