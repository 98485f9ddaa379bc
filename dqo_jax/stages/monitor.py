"""Test accuracy: greedy (logged while a stage trains, and at eval) and from k samples."""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np

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


def majority_correct(grades) -> bool:
  """Whether the most frequent extracted answer is correct (ties: the earliest; answerless
  samples cast no vote)."""
  votes = Counter(g.predicted for g in grades if g.predicted is not None)
  if not votes:
    return False
  winner = max(votes, key=votes.get)  # max keeps the first of equal counts
  return next(g.correct for g in grades if g.predicted == winner)


def sampled_accuracy(ctx: Context, params, k: int, num_examples: int = -1, desc="sample") -> dict:
  """k samples per test problem at the sampling temperature: the mean accuracy of a sample
  (what DQO's KL-regularised objective rewards), pass@k and maj@k (majority vote over the
  extracted answers, ties to the earliest; a sample without an answer casts no vote)."""
  cfg = ctx.config
  enc = ctx.test
  n = len(enc) if num_examples < 0 else min(num_examples, len(enc))
  rows = np.repeat(np.arange(n), k)
  samples = generate_all(
      ctx.policy_model,
      params,
      enc.arrays["prompt"][rows],
      enc.arrays["prompt_mask"][rows],
      jax.random.key(cfg.seed + 2),
      tok=ctx.tokenizer,
      mesh=ctx.mesh,
      batch_size=cfg.eval.batch_size,
      max_new_tokens=cfg.eval.max_new_tokens,
      temperature=cfg.sample.temperature,
      desc=desc,
  )
  refs = [enc.examples[i]["solution"] for i in rows]
  _, grades, _ = grade_samples(cfg.data.task, ctx.tokenizer, samples, refs, cfg.rewards)
  correct = np.array([g.correct for g in grades]).reshape(n, k)
  majority = [majority_correct(grades[i * k : (i + 1) * k]) for i in range(n)]
  return dict(
      k=k,
      temperature=float(cfg.sample.temperature),
      accuracy=float(correct.mean()),
      pass_at_k=float(correct.any(1).mean()),
      maj_at_k=float(np.mean(majority)),
  )


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
