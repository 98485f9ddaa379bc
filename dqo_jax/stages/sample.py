"""Stage `sample`: K responses per training prompt from the SFT policy, verified and stored.

The prompts are the first `sample.num_prompts` of `Context.rl_prompts`: all training problems,
or with `data.num_gold` set those whose worked solutions SFT never saw (only their final answers
are read, by the verifier).

The offline dataset holds, per sample, the behaviour log-probs returned by the sampler (the
distribution actually sampled from, after temperature) and the reference log-probs recomputed
with the training forward pass, so DQO never runs the reference model.
"""

from __future__ import annotations

import numpy as np

from dqo_jax import rng
from dqo_jax.generation import generate_all, grade_samples, logprobs_of
from dqo_jax.sampler import FINISH_EOS
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import Context


def run(ctx: Context) -> dict:
  params = ctx.sft_params()
  records, summary = draw(ctx, params, params, rng.key(ctx.config.seed, "sample"))
  artifacts.write_samples(ctx, records)
  return summary


def draw(ctx: Context, params, ref_params, key) -> tuple[list[dict], dict]:
  """(records, summary): `sample.samples_per_prompt` responses of the policy `params` to each of
  the first `sample.num_prompts` RL prompts, graded, with the log-probs of `ref_params` (pi_ref)
  beside the sampler's own; also what `train.rounds` > 1 draws from the current policy."""
  cfg, tok = ctx.config, ctx.tokenizer
  s = cfg.sample
  pool = ctx.rl_prompts
  n_prompts = len(pool) if s.num_prompts < 0 else min(s.num_prompts, len(pool))
  k = s.samples_per_prompt
  prompt_index = np.repeat(np.arange(n_prompts), k)
  samples = generate_all(
      ctx.policy_model,
      params,
      pool.arrays["prompt"][:n_prompts],
      pool.arrays["prompt_mask"][:n_prompts],
      key,
      tok=tok,
      mesh=ctx.mesh,
      batch_size=s.batch_size,
      max_new_tokens=cfg.data.max_response_len,
      temperature=s.temperature,
      samples_per_prompt=k,
      refill_rows=s.refill_rows,
      desc=f"sample {k} x {n_prompts} prompts",
  )
  prompt = pool.arrays["prompt"][prompt_index]
  prompt_mask = pool.arrays["prompt_mask"][prompt_index]
  examples = [pool.examples[i] for i in prompt_index]
  texts, grades, reward = grade_samples(
      cfg.data.task, tok, samples, [e["solution"] for e in examples], cfg.rewards
  )
  ref = logprobs_of(
      ctx.policy_model,
      ref_params,
      prompt,
      prompt_mask,
      samples.tokens,
      samples.lengths,
      mesh=ctx.mesh,
      batch_size=s.batch_size,
  )
  records = []
  for i, ex in enumerate(examples):
    length, pmask = int(samples.lengths[i]), prompt_mask[i].astype(bool)
    records.append(
        dict(
            prompt_index=int(prompt_index[i]),
            prompt=prompt[i][pmask].tolist(),
            response=samples.tokens[i, :length].tolist(),
            behaviour_logprobs=samples.logprobs[i, :length].tolist(),
            ref_logprobs=ref[i, :length].tolist(),
            reward=float(reward[i]),
            correct=grades[i].correct,
            predicted=grades[i].predicted,
            finish="eos" if samples.finish[i] == FINISH_EOS else "length",
            num_steps=int(ex["num_steps"]),
            text=texts[i],
        )
    )
  correct = np.array([g.correct for g in grades]).reshape(n_prompts, k)
  lengths = samples.lengths
  mask = np.arange(samples.tokens.shape[1])[None] < lengths[:, None]
  # At temperature 1, sampling from pi_ref, the sampler's and the training pass's log-probs must
  # agree: a cheap check that the KV-cache decode path and the full forward pass compute the
  # same model.
  gap = None
  if s.temperature == 1.0 and params is ref_params:
    gap = float(np.abs(samples.logprobs - ref)[mask].max())
  return records, dict(
      num_prompts=n_prompts,
      samples_per_prompt=k,
      num_samples=len(records),
      fraction_correct=float(correct.mean()),
      prompts_all_correct=float(correct.all(1).mean()),
      prompts_all_incorrect=float((~correct).all(1).mean()),
      prompts_mixed=float((correct.any(1) & ~correct.all(1)).mean()),
      fraction_cut_at_length=float(np.mean(samples.finish != FINISH_EOS)),
      mean_response_tokens=float(lengths.mean()),
      max_abs_behaviour_minus_reference_logprob=gap,
  )
