"""Stage `train`: the method in `config.method` (`dqo_jax.methods`) on the offline samples, from
the SFT checkpoint.

Every method starts from the same SFT policy (also the reference policy, whose log-probs the
sample stage stored), reads its view of the same offline dataset (`data/views.py`) and gets the
same number of steps and batch size (`config.train`). DQO and DRO also train a value model,
initialised from the SFT trunk with a fresh zero scalar head. Outputs go to DIR/<run name>.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dqo_jax import methods
from dqo_jax.checkpoint import restore_params
from dqo_jax.data import views
from dqo_jax.data.offline import FIELDS, read_records, to_arrays
from dqo_jax.stages.context import Context, rebox
from dqo_jax.stages.monitor import accuracy_monitor
from dqo_jax.stages.rollouts import read_potentials
from dqo_jax.stages.sample import SAMPLES_FILE, reference_logprobs
from dqo_jax.train import policy_step
from dqo_jax.train.loop import abstract_state, fit
from dqo_jax.train.policy_value_step import PolicyValueState, make_policy_value_step
from dqo_jax.train.state import TrainState, make_optimizer


def init_fn(ctx: Context):
  """init_fn(rng, sft_params) -> the method's fresh state, and the optimizers it uses."""
  t = ctx.config.train
  method = methods.of(ctx.config)
  policy_tx = make_optimizer(t.policy_optimizer, t.steps - method.value_warmup(ctx.config))
  if not method.trains_value:

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
  return policy_of(restore_params(ctx.checkpoint_dir(methods.run_name(ctx.config)), abstract))


def train_data(ctx: Context, sft_params) -> methods.TrainData:
  """What the method's view may read: the gold solutions, the samples, the rollouts."""
  cfg = ctx.config

  def read_samples():
    records = read_records(os.path.join(ctx.workdir, "sample", SAMPLES_FILE), fields=FIELDS)
    return records, offline_arrays(
        records, cfg.data, ctx.tokenizer.pad_id, ctx.model_cfg.vocab_size
    )

  return methods.TrainData(
      config=cfg,
      gold=ctx.gold,
      # The sampled prompts' gold solutions, when training may read them: not when answers only.
      known=None if ctx.answers_only else ctx.train,
      read_samples=read_samples,
      reference_logprobs=lambda *arrays: reference_logprobs(
          ctx, sft_params, *arrays, cfg.sample.batch_size
      ),
      read_potentials=lambda: read_potentials(ctx),
  )


def offline_arrays(
    records: list[dict], data_cfg, pad_id: int, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
  """The sample stage's records as the arrays every method's view draws its batches from."""
  arrays = to_arrays(
      records, data_cfg.max_prompt_len, data_cfg.max_response_len, pad_id, vocab_size
  )
  arrays["correct"] = np.array([views.is_success(r) for r in records], np.float32)
  return arrays


def make_step(ctx: Context, view: methods.View | None = None):
  """The step of `config.method`: its objective (built from `view`, or from the config alone
  where the method allows) in the policy or policy+value step."""
  cfg = ctx.config
  method = methods.of(cfg)
  _, txs = init_fn(ctx)
  objective = method.objective(cfg, view)
  accum = cfg.train.grad_accum_steps
  if not method.trains_value:
    return policy_step.make_policy_step(ctx.policy_model, txs[0], objective, accum)
  return make_policy_value_step(
      ctx.policy_model, ctx.value_model, *txs, objective, method.value_warmup(cfg), accum
  )


def run(ctx: Context) -> dict:
  cfg = ctx.config
  name = methods.run_name(cfg)
  fn, _ = init_fn(ctx)
  sft_params = ctx.sft_params()
  view = methods.of(cfg).view(train_data(ctx, sft_params))
  _, summary = fit(
      stage_dir=ctx.stage_dir(name),
      init_fn=fn,
      step_fn=make_step(ctx, view),
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
