"""Stage `sft`: supervised fine-tuning on the gold solutions (loss on solution tokens only), of
all training problems or of the first `data.num_gold`."""

from __future__ import annotations


from dqo_jax import rng
from dqo_jax.data.batches import batch_fn
from dqo_jax.stages.context import Context
from dqo_jax.stages.measure import accuracy_monitor
from dqo_jax.train.loop import fit

BATCH_KEYS = ("prompt", "prompt_mask", "response", "response_len")


def run(ctx: Context) -> dict:
  cfg = ctx.config
  step = ctx.sft_step()
  base = ctx.sft_base(step)  # LoRA's frozen base, else None
  arrays = {k: ctx.gold.arrays[k] for k in BATCH_KEYS}
  n, buckets = len(ctx.gold), int(cfg.sft.length_buckets)
  batch_at = batch_fn(
      arrays, n, cfg.sft.batch_size, rng.numpy_seed(cfg.seed, "sft.batches"), buckets
  )
  _, summary = fit(
      stage_dir=ctx.stage_dir("sft"),
      init_fn=step.init_fn,
      step_fn=step.step_fn,
      batch_at=batch_at,
      num_steps=cfg.sft.steps,
      mesh=ctx.mesh,
      rules=ctx.rules,
      rng=rng.key(cfg.seed, "sft.init"),
      checkpoint_cfg=cfg.checkpoint,
      max_nonfinite=cfg.sft.max_consecutive_nonfinite,
      log_every=cfg.log_every,
      desc="sft",
      on_log=accuracy_monitor(ctx, lambda state: step.policy_params(state, base)),
      checkpoint_dir=ctx.checkpoint_dir("sft"),
      on_save=ctx.copy_up,
      base=base,
      base_shardings=step.base_shardings,
  )
  return dict(summary, examples=n)
