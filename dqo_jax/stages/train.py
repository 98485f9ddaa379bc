"""Stage `train`: the method in `config.method` (`dqo_jax.methods`) on the offline samples, from
the SFT checkpoint.

Every method starts from the same SFT policy (also the reference policy, whose log-probs the
sample stage stored), reads its view of the same offline dataset (`data/views.py`) and gets the
same number of steps and batch size (`config.train`). DQO and DRO also train a value model,
initialised from the SFT trunk with a fresh zero scalar head. Outputs go to DIR/<run name>.
"""

from __future__ import annotations

from dqo_jax import lora, methods, rng
from dqo_jax.data.offline import offline_arrays
from dqo_jax.generation import logprobs_of
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import Context
from dqo_jax.stages.measure import accuracy_monitor
from dqo_jax.train.build import build_train_step
from dqo_jax.train.loop import fit


def train_data(ctx: Context, reference) -> methods.TrainData:
  """What the method's view may read: the gold solutions, the samples, the rollouts;
  `reference()` gives pi_ref's parameters."""
  cfg = ctx.config

  def read_samples():
    records = artifacts.read_samples(ctx)
    return records, offline_arrays(
        records, cfg.data, ctx.tokenizer.pad_id, ctx.model_cfg.vocab_size
    )

  return methods.TrainData(
      config=cfg,
      gold=ctx.gold,
      # The sampled prompts' gold solutions, when training may read them: not when answers only.
      known=None if ctx.answers_only else ctx.train,
      read_samples=read_samples,
      reference_logprobs=lambda *arrays: logprobs_of(
          ctx.policy_model, reference(), *arrays, mesh=ctx.mesh, batch_size=cfg.sample.batch_size
      ),
      read_potentials=lambda: artifacts.read_potentials(ctx),
  )


def run(ctx: Context) -> dict:
  cfg = ctx.config
  name = methods.run_name(cfg)
  held = dict(sft=ctx.sft_params())

  def reference():
    # pi_ref: the SFT policy; with QLoRA, which holds it only quantized once the base is built,
    # that base dequantized when read (also where the policy starts).
    return held["sft"] if held["sft"] is not None else lora.dequantize(base)

  view = methods.of(cfg).view(train_data(ctx, reference))
  step = build_train_step(cfg, ctx.model_cfg, ctx.mesh, view)
  base = step.base_of(held["sft"])  # LoRA's frozen base, else None
  if step.quantized_base:
    held["sft"] = None
  _, summary = fit(
      stage_dir=ctx.stage_dir(name),
      init_fn=step.init_fn,
      step_fn=step.step_fn,
      batch_at=view.batch_at,
      num_steps=cfg.train.steps,
      mesh=ctx.mesh,
      rules=ctx.rules,
      rng=rng.key(cfg.seed, "train.init"),
      checkpoint_cfg=cfg.checkpoint,
      max_nonfinite=cfg.train.max_consecutive_nonfinite,
      log_every=cfg.log_every,
      desc=name,
      init_args=(held["sft"],),  # None with QLoRA, whose adapters start without it
      on_log=accuracy_monitor(
          ctx, lambda state: step.policy_params(state, base), ref_params_of=reference
      ),
      checkpoint_dir=ctx.checkpoint_dir(name),
      on_save=ctx.copy_up,
      base=base,
      base_shardings=step.base_shardings,
  )
  return dict(summary, method=cfg.method, examples=view.size, **view.describe)
