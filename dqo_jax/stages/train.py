"""Stage `train`: the method in `config.method` on the offline samples, from the SFT checkpoint.

Every method starts from the same SFT policy (also the reference policy, whose log-probs the
sample stage stored), reads its view of the same offline dataset (`data/views.py`) and gets the
same number of steps and batch size (`config.train`). DQO and DRO also train a value model,
initialised from the SFT trunk with a fresh zero scalar head. Outputs go to DIR/<run name>.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from dqo_jax import bandit_losses
from dqo_jax.checkpoint import restore_params
from dqo_jax.data import views
from dqo_jax.data.batches import batch_fn
from dqo_jax.data.offline import FIELDS, read_records, to_arrays
from dqo_jax.stages.context import Context, rebox, run_name
from dqo_jax.stages.monitor import accuracy_monitor
from dqo_jax.stages.rollouts import read_potentials
from dqo_jax.stages.sample import SAMPLES_FILE, reference_logprobs
from dqo_jax.train import policy_step
from dqo_jax.train.loop import abstract_state, fit
from dqo_jax.train.policy_value_step import (
    PolicyValueState,
    dqo_objective,
    dro_objective,
    make_policy_value_step,
)
from dqo_jax.train.state import TrainState, make_optimizer

METHODS = ("sft", "rft", "dpo", "kto", "dro", "dqo")
VALUE_METHODS = ("dro", "dqo")


def init_fn(ctx: Context):
  """init_fn(rng, sft_params) -> the method's fresh state, and the optimizers it uses."""
  t = ctx.config.train
  warmup = ctx.config.dqo.value_warmup_steps if ctx.config.method == "dqo" else 0
  policy_tx = make_optimizer(t.policy_optimizer, t.steps - warmup)
  if ctx.config.method not in VALUE_METHODS:

    def policy_only(rng, sft_params):
      return TrainState.create(rebox(ctx.init_params(ctx.policy_model, rng), sft_params), policy_tx)

    return policy_only, (policy_tx,)
  value_tx = make_optimizer(t.value_optimizer, t.steps)

  def policy_and_value(rng, sft_params):
    policy_rng, value_rng = jax.random.split(rng)
    policy = rebox(ctx.init_params(ctx.policy_model, policy_rng), sft_params)
    value = ctx.value_params_from(sft_params, value_rng)
    return PolicyValueState(
        policy=TrainState.create(policy, policy_tx), value=TrainState.create(value, value_tx)
    )

  return policy_and_value, (policy_tx, value_tx)


def policy_of(state):
  return state.policy.params if isinstance(state, PolicyValueState) else state.params


def trained_policy_params(ctx: Context):
  """The trained policy of `config.method`, read from its run's newest checkpoint."""
  fn, _ = init_fn(ctx)
  # Shapes suffice to describe the state: no need to read the SFT checkpoint again.
  sft_shapes = ctx.sft_abstract_state().params
  abstract, _ = abstract_state(fn, ctx.mesh, ctx.rules, (sft_shapes,))
  return policy_of(restore_params(ctx.checkpoint_dir(run_name(ctx.config)), abstract))


@dataclasses.dataclass
class View:
  """A method's training data: `batch_at(step)` -> batch, and a description for the summary."""

  batch_at: Callable[[int], dict]
  size: int
  describe: dict


def _view(ctx: Context, sft_params) -> tuple[View, Callable]:
  """The method's data view and its step function."""
  cfg = ctx.config
  method, t, data = cfg.method, cfg.train, cfg.data
  seed = cfg.seed + 2
  accum = t.grad_accum_steps
  buckets = int(t.get("length_buckets", 1))
  _, txs = init_fn(ctx)
  if method == "sft":
    arrays = {k: ctx.gold.arrays[k] for k in views.TOKEN_KEYS}
    view = View(batch_fn(arrays, len(ctx.gold), t.batch_size, seed, buckets), len(ctx.gold), {})
    return view, policy_step.make_policy_step(
        ctx.policy_model, txs[0], policy_step.nll_objective, accum
    )

  records = read_records(os.path.join(ctx.workdir, "sample", SAMPLES_FILE), fields=FIELDS)
  arrays = offline_arrays(records, data, ctx.tokenizer.pad_id, ctx.model_cfg.vocab_size)
  n = len(records)
  if method == "rft":
    # The sampled prompts' gold solutions, when training may read them: not when answers only.
    known = None if ctx.answers_only else ctx.train
    rft = views.rft_arrays(records, arrays, ctx.gold, known)
    size = len(rft["response_len"])
    view = View(
        batch_fn(rft, size, t.batch_size, seed, buckets),
        size,
        dict(gold=len(ctx.gold), kept_samples=size - len(ctx.gold)),
    )
    return view, policy_step.make_policy_step(
        ctx.policy_model, txs[0], policy_step.nll_objective, accum
    )
  if method == "dpo":
    pairs = views.dpo_pairs(records, cfg.dpo.max_pairs_per_prompt, seed)
    view = View(
        batch_fn(arrays, len(pairs), t.batch_size, seed, buckets, rows=lambda idx: pairs[idx]),
        len(pairs),
        dict(pairs=len(pairs), prompts=len({records[i]["prompt_index"] for i in pairs[:, 0]})),
    )
    objective = policy_step.dpo_objective(float(cfg.dpo.beta))
    return view, policy_step.make_policy_step(ctx.policy_model, txs[0], objective, accum)
  if method == "kto":
    partner = views.mismatched_partners(records)
    mismatched = dict(arrays, response=arrays["response"][partner])
    mismatched["response_len"] = arrays["response_len"][partner]
    mismatched["correct"] = np.zeros_like(arrays["correct"])
    # log pi_ref of the mismatched (prompt, response) pairs, computed once with the SFT policy.
    mismatched["ref_logprobs"] = reference_logprobs(
        ctx,
        sft_params,
        arrays["prompt"],
        arrays["prompt_mask"],
        mismatched["response"],
        mismatched["response_len"],
        cfg.sample.batch_size,
    )
    both = {k: np.concatenate([arrays[k], mismatched[k]]) for k in arrays}
    n_d = int(arrays["correct"].sum())
    lambda_d, lambda_u = bandit_losses.kto_lambdas(
        n_d, n - n_d, target_ratio=float(cfg.kto.desirable_ratio)
    )
    view = View(
        batch_fn(
            both, n, t.batch_size, seed, buckets, rows=lambda idx: np.stack([idx, idx + n], 1)
        ),
        n,
        dict(desirable=n_d, undesirable=n - n_d, lambda_d=lambda_d, lambda_u=lambda_u),
    )
    objective = policy_step.kto_objective(float(cfg.kto.beta), lambda_d, lambda_u)
    return view, policy_step.make_policy_step(ctx.policy_model, txs[0], objective, accum)
  if method == "dqo" and cfg.dqo.process.enabled:
    arrays.update(
        views.process_arrays(read_potentials(ctx), arrays["response_len"], data.max_response_len)
    )
  return View(batch_fn(arrays, n, t.batch_size, seed, buckets), n, {}), policy_value_step(ctx)


def offline_arrays(
    records: list[dict], data_cfg, pad_id: int, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
  """The sample stage's records as the arrays every method's view draws its batches from."""
  arrays = to_arrays(
      records, data_cfg.max_prompt_len, data_cfg.max_response_len, pad_id, vocab_size
  )
  arrays["correct"] = np.array([views.is_success(r) for r in records], np.float32)
  return arrays


def policy_value_step(ctx: Context):
  """The step of DRO or DQO (`config.method`), which train a value model beside the policy."""
  cfg = ctx.config
  _, txs = init_fn(ctx)
  if cfg.method == "dro":
    objective, warmup = dro_objective(float(cfg.dro.beta)), 0
  else:
    objective, warmup = dqo_objective(cfg.dqo, cfg.rewards), int(cfg.dqo.value_warmup_steps)
  return make_policy_value_step(
      ctx.policy_model, ctx.value_model, *txs, objective, warmup, cfg.train.grad_accum_steps
  )


def run(ctx: Context) -> dict:
  cfg = ctx.config
  name = run_name(cfg)
  fn, _ = init_fn(ctx)
  sft_params = ctx.sft_params()
  view, step_fn = _view(ctx, sft_params)
  _, summary = fit(
      stage_dir=ctx.stage_dir(name),
      init_fn=fn,
      step_fn=step_fn,
      batch_at=view.batch_at,
      num_steps=cfg.train.steps,
      mesh=ctx.mesh,
      rules=ctx.rules,
      rng=jax.random.key(cfg.seed + 3),
      checkpoint_cfg=cfg.checkpoint,
      max_nonfinite=cfg.train.max_consecutive_nonfinite,
      log_every=cfg.log_every,
      desc=name,
      init_args=(sft_params,),
      on_log=accuracy_monitor(ctx, policy_of, ref_params=sft_params),
      checkpoint_dir=ctx.checkpoint_dir(name),
      on_save=ctx.copy_up,
  )
  return dict(summary, method=cfg.method, examples=view.size, **view.describe)
