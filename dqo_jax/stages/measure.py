"""Accuracy, greedy and from k samples, of a split; and the KL-regularised objective
E[R] - beta KL(pi || pi_ref) of fresh samples. While a stage trains, only the train and
validation splits are read (every `eval.every` steps); the eval stage reads test."""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np

from dqo_jax import rng
from dqo_jax.generation import accuracy_by_steps, generate_all, grade_samples, logprobs_of
from dqo_jax.stages.context import Context


def _first(ctx: Context, split: str, num_examples: int):
  """The encoded split and how many of its first examples to use (-1: all)."""
  enc = ctx.split(split)
  return enc, len(enc) if num_examples < 0 else min(num_examples, len(enc))


def greedy_accuracy(
    ctx: Context, params, num_examples: int = -1, desc: str = "eval", split: str = "test"
) -> dict:
  """Greedy decoding accuracy on the first `num_examples` problems of `split` (-1: all)."""
  cfg = ctx.config
  enc, n = _first(ctx, split, num_examples)
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
      refill_rows=cfg.eval.refill_rows,
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


def sampled_accuracy(
    ctx: Context, params, k: int, num_examples: int = -1, desc="sample", split: str = "test"
) -> dict:
  """k samples per problem of `split` at the sampling temperature: the mean accuracy of a
  sample (what DQO's KL-regularised objective rewards), pass@k and maj@k (majority vote over
  the extracted answers, ties to the earliest; a sample without an answer casts no vote)."""
  cfg = ctx.config
  enc, n = _first(ctx, split, num_examples)
  rows = np.repeat(np.arange(n), k)
  samples = generate_all(
      ctx.policy_model,
      params,
      enc.arrays["prompt"][:n],
      enc.arrays["prompt_mask"][:n],
      rng.key(cfg.seed, "eval.sampled"),
      tok=ctx.tokenizer,
      mesh=ctx.mesh,
      batch_size=cfg.eval.batch_size,
      max_new_tokens=cfg.eval.max_new_tokens,
      temperature=cfg.sample.temperature,
      samples_per_prompt=k,
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


def sampled_objective(
    ctx: Context, params, ref_params, split: str, num_examples: int, beta: float, rng
) -> dict:
  """One fresh temperature-1 sample y ~ pi(.|x) per problem of `split`: its mean reward E[R],
  the Monte-Carlo KL(pi || pi_ref) = E[sum_t log pi(a_t|s_t) - log pi_ref(a_t|s_t)], and the
  objective DQO maximises, E[R] - beta KL. Both log-probs come from the training forward pass."""
  cfg = ctx.config
  enc, n = _first(ctx, split, num_examples)
  prompt, prompt_mask = enc.arrays["prompt"][:n], enc.arrays["prompt_mask"][:n]
  samples = generate_all(
      ctx.policy_model,
      params,
      prompt,
      prompt_mask,
      rng,
      tok=ctx.tokenizer,
      mesh=ctx.mesh,
      batch_size=cfg.eval.batch_size,
      max_new_tokens=cfg.data.max_response_len,
      desc=f"objective {split}",
  )
  refs = [ex["solution"] for ex in enc.examples[:n]]
  _, _, reward = grade_samples(cfg.data.task, ctx.tokenizer, samples, refs, cfg.rewards)
  logp = [
      logprobs_of(
          ctx.policy_model,
          p,
          prompt,
          prompt_mask,
          samples.tokens,
          samples.lengths,
          mesh=ctx.mesh,
          batch_size=cfg.eval.batch_size,
      )
      for p in (params, ref_params)
  ]
  mask = np.arange(samples.tokens.shape[1])[None] < samples.lengths[:, None]
  kl = float(np.mean(np.sum((logp[0] - logp[1]) * mask, axis=1)))
  return dict(reward=float(np.mean(reward)), kl=kl, objective=float(np.mean(reward)) - beta * kl)


def accuracy_monitor(ctx: Context, params_of, ref_params_of=None):
  """An `on_log` hook for `fit`: every `eval.every` steps, greedy accuracy on the first
  `eval.monitor_examples` validation problems; with `ref_params_of()` (pi_ref, for the methods
  trained from the SFT policy) also `sampled_objective` on as many training and validation
  prompts, whose difference is the generalisation gap of what the method optimises."""
  cfg = ctx.config
  every, n = cfg.eval.every, cfg.eval.monitor_examples
  beta = float(cfg.dqo.beta)

  def on_log(step: int, state) -> dict:
    if not every or step % every or ctx.validation is None:
      return {}
    params = params_of(state)
    result = greedy_accuracy(ctx, params, n, desc="monitor", split="validation")
    out = {
        "val_accuracy": result["accuracy"],
        **{f"val_accuracy_steps_{k}": v for k, v in result["by_steps"].items()},
    }
    if ref_params_of is not None:
      ref_params = ref_params_of()
      key = jax.random.fold_in(rng.key(cfg.seed, "monitor.objective"), step)
      for split, name in (("train", "train_prompts"), ("validation", "val")):
        o = sampled_objective(ctx, params, ref_params, split, n, beta, key)
        out.update({f"{name}_{k}": v for k, v in o.items()})
    return out

  return on_log
