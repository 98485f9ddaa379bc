"""Stage `rollouts`: Monte-Carlo estimates of the reference policy's success from every reasoning
step of every offline sample, for DQO's process supervision (docs/method.md).

A step ends at a token holding `dqo.process.delimiter`. From the bare prompt (p_0) and from each
prefix ending at a delimiter (p_j), `rollouts_per_step` completions are sampled from pi_ref with
the sample stage's temperature and length limit and verified; p_j is the fraction correct.
Identical prefixes (every sample of a prompt shares p_0, and often its first steps) are rolled
out once. Written once per workdir, beside the offline dataset, and reused by every DQO run.
"""

from __future__ import annotations

import numpy as np

from dqo_jax import rewards, rng
from dqo_jax.data.batches import left_pad
from dqo_jax.data.views import is_success
from dqo_jax.generation import generate_all
from dqo_jax.sampler import FINISH_EOS, Samples
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import Context


def step_boundaries(response: list[int], is_delimiter) -> list[int]:
  """Indices b_j of the delimiter tokens that end a step, the last token excluded (the state
  after it is terminal, so it needs no estimate)."""
  return [t for t, tok in enumerate(response[:-1]) if is_delimiter(tok)]


def delimiter_test(tok, delimiter: str):
  """tok_id -> whether the token's text contains the delimiter (cached per id)."""
  cache = {}

  def is_delimiter(i: int) -> bool:
    if i not in cache:
      cache[i] = delimiter in tok.decode([i])
    return cache[i]

  return is_delimiter


def sample_rollouts(
    model,
    params,
    tokens: np.ndarray,
    mask: np.ndarray,
    remaining: np.ndarray,
    m: int,
    key,
    *,
    shared_prefix: bool = True,
    by_length: bool = True,
    trim: bool = True,
    **generate_kw,
) -> Samples:
  """M completions of each of N left-padded prefixes [N, W] -> Samples of N * M rows,
  prefix-major (row i * M + j: completion j of prefix i).

  `shared_prefix`: each prefix is prefilled once and decoded M times. `by_length`: prefixes go
  through the sampler in the order of their expected completion length (`remaining` [N], what
  the offline sample they came from still generated), so that the rows of a batch end at about
  the same step instead of waiting for the batch's longest. `trim`: a batch's prefixes lose the
  columns that are padding in all of them (`generate_all`'s width_multiple). They change the
  order of the random draws, not the distribution of a completion (benchmarks/rollouts.py
  compares the ways).
  """
  n = tokens.shape[0]
  order = np.argsort(-remaining, kind="stable") if by_length else np.arange(n)
  if shared_prefix:
    rows, k = order, m
  else:
    rows, k = np.repeat(order, m), 1
  s = generate_all(
      model,
      params,
      tokens[rows],
      mask[rows],
      key,
      samples_per_prompt=k,
      width_multiple=16 if trim else 0,
      desc=f"rollouts {m} x {n} prefixes",
      **generate_kw,
  )
  # Row r of `s` is a completion of prefix order[r // M]: put prefix i's M completions at
  # rows i * M ... i * M + M - 1.
  inverse = np.empty(n, np.int64)
  inverse[order] = np.arange(n)
  back = (inverse[:, None] * m + np.arange(m)[None]).reshape(-1)
  return Samples(*(x[back] for x in s))


def distinct_prefixes(ctx: Context, records: list[dict]):
  """The rollouts' starting points: each sample's step boundaries, every distinct prefix
  (prompt index, response tokens up to and including b_j) with its id, the prefixes left-padded
  ([N, W] tokens and mask), and for each the most tokens any sample sharing it went on for (how
  long its rollouts will likely run)."""
  tok, data = ctx.tokenizer, ctx.config.data
  is_delimiter = delimiter_test(tok, ctx.config.dqo.process.delimiter)
  boundaries = [step_boundaries(r["response"], is_delimiter) for r in records]
  prefix_id, prefixes, remaining = {}, [], []
  for r, bs in zip(records, boundaries):
    for end in [0] + [b + 1 for b in bs]:
      key = (r["prompt_index"], tuple(r["response"][:end]))
      if key not in prefix_id:
        prefix_id[key] = len(prefixes)
        prefixes.append((r, end))
        remaining.append(0)
      j = prefix_id[key]
      remaining[j] = max(remaining[j], len(r["response"]) - end)
  tokens, mask = left_pad(
      [r["prompt"] + r["response"][:end] for r, end in prefixes],
      data.max_prompt_len + data.max_response_len,
      tok.pad_id,
  )
  return boundaries, prefix_id, prefixes, tokens, mask, np.array(remaining)


def run(ctx: Context) -> dict:
  cfg, tok = ctx.config, ctx.tokenizer
  ps, data = cfg.dqo.process, cfg.data
  records = artifacts.read_samples(ctx)
  boundaries, prefix_id, prefixes, tokens, mask, remaining = distinct_prefixes(ctx, records)
  m = int(ps.rollouts_per_step)
  rows = np.repeat(np.arange(len(prefixes)), m)
  samples = sample_rollouts(
      ctx.policy_model,
      ctx.sft_params(),
      tokens,
      mask,
      remaining,
      m,
      rng.key(cfg.seed, "rollouts"),
      tok=tok,
      mesh=ctx.mesh,
      batch_size=ps.batch_size,
      max_new_tokens=data.max_response_len,
      temperature=cfg.sample.temperature,
      refill_rows=ps.refill_rows,
  )
  texts, references, fits = [], [], []
  for j, row in enumerate(rows):
    r, end = prefixes[row]
    completion = samples.tokens[j, : samples.lengths[j]].tolist()
    # The same length limit as the offline samples: prefix and completion together.
    fits.append(samples.finish[j] == FINISH_EOS and end + len(completion) <= data.max_response_len)
    texts.append(tok.decode(r["response"][:end] + completion))
    references.append(ctx.rl_prompts.examples[r["prompt_index"]]["solution"])
  grades = rewards.grade_batch(data.task, texts, references)
  success = np.array([g.correct and ok for g, ok in zip(grades, fits)], np.float32)
  p = success.reshape(len(prefixes), m).mean(1)

  out = []
  for r, bs in zip(records, boundaries):
    ends = [0] + [b + 1 for b in bs]
    potentials = [float(p[prefix_id[(r["prompt_index"], tuple(r["response"][:e]))]]) for e in ends]
    out.append(dict(boundaries=bs, potentials=potentials))
  artifacts.write_potentials(ctx, out)

  # A check that the estimates carry signal: the last step of a correct sample should predict
  # success more often than the last step of an incorrect one.
  last = np.array([o["potentials"][-1] for o in out])
  ok = np.array([is_success(r) for r in records])
  return dict(
      prefixes=len(prefixes),
      rollouts=len(rows),
      steps_per_sample=float(np.mean([len(b) for b in boundaries])),
      mean_p0=float(np.mean([o["potentials"][0] for o in out])),
      last_step_p_correct=float(last[ok].mean()) if ok.any() else None,
      last_step_p_incorrect=float(last[~ok].mean()) if (~ok).any() else None,
  )
