"""DQO (docs/method.md): a soft Q-function parameterised by the policy, trained on soft
lambda-returns with a value model V(s_t); with process supervision (`dqo.process.enabled`, run
`dqo_ps`), rewards shaped by Monte-Carlo rollouts' success estimates at step boundaries."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dqo_jax import losses
from dqo_jax.data import views
from dqo_jax.errors import UserError
from dqo_jax.methods import Method, TrainData, View
from dqo_jax.train.forward import response_mask
from dqo_jax.train.policy_value_step import make_policy_value_step, masked_mean


@dataclasses.dataclass(frozen=True)
class Process:
  """Process supervision (`config.dqo.process`): the shaping's scale and the value model's warm
  start toward R_c p + R_i (1 - p) - alpha p at step boundaries (rewards from `config.rewards`)."""

  alpha: float
  value_weight: float
  value_decay_steps: int
  correct: float
  incorrect: float


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the DQO step reads, fixed once from the config before anything is traced (the
  meaning of each field is in `defaults`); `process` is None without process supervision."""

  beta: float
  lam: float
  importance_traces: bool
  rho_max: float
  c_max: float
  return_impl: str
  loss_norm: str
  value_warmup_steps: int
  process: Process | None = None

  @classmethod
  def from_config(cls, config) -> "Settings":
    d, ps = config.dqo, config.dqo.process
    process = None
    if ps.enabled:
      process = Process(
          alpha=float(ps.alpha),
          value_weight=float(ps.value_weight),
          value_decay_steps=int(ps.value_decay_steps),
          correct=float(config.rewards.correct),
          incorrect=float(config.rewards.incorrect),
      )
    return cls(
        beta=float(d.beta),
        lam=float(d.lam),
        importance_traces=bool(d.importance_traces),
        rho_max=float(d.rho_max),
        c_max=float(d.c_max),
        return_impl=str(d.return_impl),
        loss_norm=str(d.loss_norm),
        value_warmup_steps=int(d.value_warmup_steps),
        process=process,
    )


def objective(s: Settings):
  beta, lam, norm, ps = s.beta, s.lam, s.loss_norm, s.process

  def losses_of(logp, values, batch, step):
    mask = response_mask(batch).astype(jnp.float32)
    ref = batch["ref_logprobs"]
    rewards = losses.place_outcome_rewards(batch["reward"], batch["response_len"], mask.shape[1])
    if ps is not None:
      rewards = rewards + losses.potential_shaping(batch["potentials"], mask, alpha=ps.alpha)
    returns = losses.soft_lambda_returns(
        rewards,
        values,
        logp,
        ref,
        mask,
        beta=beta,
        lam=lam,
        behaviour_logprobs=batch["behaviour_logprobs"] if s.importance_traces else None,
        rho_max=s.rho_max,
        c_max=s.c_max,
        impl=s.return_impl,
    )
    policy_loss = lambda lp: losses.dqo_q_loss(
        lp, ref, values, rewards, returns, mask, beta=beta, lam=lam, normalize=norm
    )
    value_loss = lambda v: losses.dqo_value_loss(v, returns, mask, normalize=norm)
    if ps is not None and ps.value_weight:
      value_loss = _with_process_value_loss(value_loss, batch, ps, step)

    log_ratio = logp - ref
    advantage = losses.q_targets(rewards, values, returns, mask, lam=lam) - beta * log_ratio
    adv_mean = masked_mean(advantage, mask)
    metrics = dict(
        mean_value=masked_mean(values, mask),
        mean_log_ratio=masked_mean(log_ratio, mask),
        seq_log_ratio=jnp.mean(jnp.sum(log_ratio * mask, axis=1)),
        mean_return=masked_mean(returns, mask),
        advantage_mean=adv_mean,
        advantage_std=jnp.sqrt(masked_mean((advantage - adv_mean) ** 2, mask)),
        reward=jnp.mean(batch["reward"]),
    )
    if ps is not None:
      # V(s_0) beside the rollouts' Monte-Carlo success rate p_0 of pi_ref from the bare prompt:
      # where V stands against what the prompt is worth under pi_ref (under shaping V* is
      # offset by -alpha p_0, and above p_0 by the soft improvement over pi_ref).
      metrics.update(
          prompt_value=jnp.mean(values[:, 0]), prompt_mc_success=jnp.mean(batch["potentials"][:, 0])
      )
    return policy_loss, value_loss, metrics

  return losses_of


def _with_process_value_loss(value_loss, batch, ps: Process, step):
  """Adds the warm start of V at step boundaries: (V(s) - (R_c p + R_i (1 - p) - alpha p))^2,
  weighted by `value_weight`, decaying linearly to 0 over `value_decay_steps`."""
  p, at = batch["potentials"], batch["boundary_mask"]
  target = ps.correct * p + ps.incorrect * (1.0 - p) - ps.alpha * p
  decay = jnp.maximum(0.0, 1.0 - step / max(ps.value_decay_steps, 1))
  weight = ps.value_weight * decay
  return lambda v: value_loss(v) + weight * masked_mean(jnp.square(v - target), at)


def make_dqo_step(policy_model, value_model, policy_tx, value_tx, s: Settings, grad_accum_steps=1):
  """The DQO step."""
  return make_policy_value_step(
      policy_model,
      value_model,
      policy_tx,
      value_tx,
      objective(s),
      s.value_warmup_steps,
      grad_accum_steps,
  )


def view(data: TrainData) -> View:
  records, arrays = data.samples
  cfg = data.config
  if cfg.dqo.process.enabled:
    arrays = dict(
        arrays,
        **views.process_arrays(
            data.read_potentials(), arrays["response_len"], cfg.data.max_response_len
        ),
    )
  return View(data.batches(arrays, len(records)), len(records), {})


def defaults(beta: float) -> dict:
  return dict(
      beta=beta,
      lam=1.0,
      importance_traces=False,
      rho_max=1.0,
      c_max=1.0,
      # How G_t's recursion runs: "scan" (lax.scan over tokens; the faster on CPU, see
      # benchmarks/returns.py) or "associative" (lax.associative_scan, log depth).
      return_impl="scan",
      loss_norm="token",  # "token": mean over valid tokens; "sequence": mean of per-sequence means
      value_warmup_steps=0,  # steps at the start that update only the value model
      # Potential-based shaping from Monte-Carlo rollouts of pi_ref at every step delimiter,
      # computed once by the `rollouts` stage (docs/method.md, "Process supervision").
      process=dict(
          enabled=False,
          rollouts_per_step=4,
          alpha=1.0,
          delimiter="\n",
          value_weight=0.0,  # > 0: also regress V onto the rollouts' estimate at boundaries
          value_decay_steps=100,  # ... with a weight decaying linearly to 0 over these steps
          batch_size=256,
          # Refilled decode slots, this many rows at a time (0: batches of prefixes ordered by
          # expected length; benchmarks/rollouts.py measures both).
          refill_rows=32,
      ),
  )


def check(config) -> None:
  d = config.dqo
  if d.importance_traces and d.c_max > d.rho_max:
    raise UserError(
        f"config.dqo.c_max={d.c_max} exceeds rho_max={d.rho_max}; V-trace needs c_max <= rho_max"
    )
  if d.loss_norm not in ("token", "sequence"):
    raise UserError(f"config.dqo.loss_norm={d.loss_norm!r}; use 'token' or 'sequence'")
  if d.return_impl not in losses.RETURN_IMPLS:
    raise UserError(
        f"config.dqo.return_impl={d.return_impl!r}; choose from {', '.join(losses.RETURN_IMPLS)}"
    )
  if not 0 <= d.value_warmup_steps < config.train.steps:
    raise UserError(
        f"config.dqo.value_warmup_steps={d.value_warmup_steps} must lie in [0, train.steps)"
    )
  if d.process.enabled and d.process.rollouts_per_step < 1:
    raise UserError("config.dqo.process.rollouts_per_step must be at least 1")
  if not 0.0 <= d.lam <= 1.0:
    raise UserError(f"config.dqo.lam={d.lam} must lie in [0, 1]")


METHOD = Method(
    name="dqo",
    order=6,
    summary="DQO: soft Q-learning of the policy on soft lambda-returns, with a value model V(s)",
    view=view,
    objective=lambda config, view: objective(Settings.from_config(config)),
    trains_value=True,
    defaults=defaults,
    check=check,
    runs=("dqo", "dqo_ps"),
    run_name=lambda config: "dqo_ps" if config.dqo.process.enabled else "dqo",
    rollout_runs=("dqo_ps",),
    variants={"dqo_ps": {"dqo.process.enabled": True}},
    ablations={
        "dqo_lam0": {"dqo.lam": 0.0},
        "dqo_lam0.95": {"dqo.lam": 0.95},
        "dqo_traces": {"dqo.importance_traces": True},
        "dqo_ps_lam0.95": {"dqo.process.enabled": True, "dqo.lam": 0.95},
    },
    value_warmup=lambda config: int(config.dqo.value_warmup_steps),
)
