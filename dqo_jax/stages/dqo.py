"""Stage `dqo`: Direct Q-function Optimization on the offline samples.

Policy from the SFT checkpoint (also the reference policy, whose log-probs the sample stage
stored); value model from the SFT trunk with a fresh zero scalar head; both updated every step.
"""

from __future__ import annotations

import os

import jax

from dqo_jax.checkpoint import restore_params
from dqo_jax.data.batches import batch_indices, take
from dqo_jax.data.offline import read_records, to_arrays
from dqo_jax.stages.context import Context, rebox
from dqo_jax.stages.monitor import accuracy_monitor
from dqo_jax.stages.sample import SAMPLES_FILE
from dqo_jax.train.dqo_step import DQOState, make_dqo_step
from dqo_jax.train.loop import abstract_state, fit
from dqo_jax.train.state import TrainState, make_optimizer


def dqo_init_fn(ctx: Context):
  """(init_fn, policy_tx, value_tx); init_fn(rng, sft_params) builds the DQO state."""
  d = ctx.config.dqo
  policy_tx = make_optimizer(d.policy_optimizer, d.steps - d.value_warmup_steps)
  value_tx = make_optimizer(d.value_optimizer, d.steps)

  def init_fn(rng, sft_params):
    policy_rng, value_rng = jax.random.split(rng)
    policy = rebox(ctx.init_params(ctx.policy_model, policy_rng), sft_params)
    value = ctx.value_params_from(sft_params, value_rng)
    return DQOState(
        policy=TrainState.create(policy, policy_tx), value=TrainState.create(value, value_tx)
    )

  return init_fn, policy_tx, value_tx


def dqo_policy_params(ctx: Context):
  """The trained DQO policy, read from the stage's newest checkpoint."""
  init_fn, _, _ = dqo_init_fn(ctx)
  # Shapes suffice to describe the state: no need to read the SFT checkpoint again.
  sft_shapes = ctx.sft_abstract_state().params
  abstract, _ = abstract_state(init_fn, ctx.mesh, ctx.rules, (sft_shapes,))
  return restore_params(os.path.join(ctx.workdir, "dqo", "checkpoints"), abstract).policy.params


def run(ctx: Context) -> dict:
  cfg = ctx.config
  d, data = cfg.dqo, cfg.data
  records = read_records(os.path.join(ctx.workdir, "sample", SAMPLES_FILE))
  arrays = to_arrays(records, data.max_prompt_len, data.max_response_len, ctx.tokenizer.pad_id)
  n = len(records)
  init_fn, policy_tx, value_tx = dqo_init_fn(ctx)
  step_fn = make_dqo_step(ctx.policy_model, ctx.value_model, policy_tx, value_tx, d)
  batch_at = lambda i: take(arrays, batch_indices(n, d.batch_size, i, cfg.seed + 2))
  _, summary = fit(
      stage_dir=ctx.stage_dir("dqo"),
      init_fn=init_fn,
      step_fn=step_fn,
      batch_at=batch_at,
      num_steps=d.steps,
      mesh=ctx.mesh,
      rules=ctx.rules,
      rng=jax.random.key(cfg.seed + 3),
      checkpoint_cfg=cfg.checkpoint,
      log_every=cfg.log_every,
      desc="dqo",
      init_args=(ctx.sft_params(),),
      on_log=accuracy_monitor(ctx, lambda state: state.policy.params),
  )
  return dict(summary, num_samples=n)
