"""Greedy accuracy on a fixed slice of the test split, logged while a stage trains."""

from __future__ import annotations

import jax

from dqo_jax.generation import accuracy_by_steps, generate_all, grade_samples
from dqo_jax.stages.context import Context


def greedy_accuracy(ctx: Context, params, num_examples: int = -1, desc: str = "eval") -> dict:
  """Greedy decoding accuracy on the first `num_examples` test problems (-1: all)."""
  cfg = ctx.config
  enc = ctx.test
  n = len(enc) if num_examples < 0 else min(num_examples, len(enc))
  samples = generate_all(
      ctx.policy_model,
      params,
      enc.arrays["prompt"][:n],
      enc.arrays["prompt_mask"][:n],
      jax.random.key(0),
      tok=ctx.tokenizer,
      mesh=ctx.mesh,
      batch_size=cfg.eval.batch_size,
      max_new_tokens=cfg.eval.max_new_tokens,
      greedy=True,
      desc=desc,
  )
  refs = [ex["solution"] for ex in enc.examples[:n]]
  _, grades, _ = grade_samples(cfg.data.task, ctx.tokenizer, samples, refs, cfg.rewards)
  return accuracy_by_steps([g.correct for g in grades], enc.arrays["num_steps"][:n])


def accuracy_monitor(ctx: Context, params_of):
  """An `on_log` hook for `fit`: every `eval.every` steps, accuracy on `eval.monitor_examples`."""
  every, n = ctx.config.eval.every, ctx.config.eval.monitor_examples

  def on_log(step: int, state) -> dict:
    if not every or step % every:
      return {}
    result = greedy_accuracy(ctx, params_of(state), n, desc="monitor")
    return {
        "accuracy": result["accuracy"],
        **{f"accuracy_steps_{k}": v for k, v in result["by_steps"].items()},
    }

  return on_log
