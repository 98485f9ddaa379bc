"""Batched generation over encoded prompts, decoding and grading of the responses."""

from __future__ import annotations

import functools
from collections import defaultdict

import jax
import numpy as np

from dqo_jax import distributed, rewards, sampler, sharding
from dqo_jax.model import Transformer
from dqo_jax.progress import tqdm
from dqo_jax.sampler import FINISH_LENGTH, Samples, generate
from dqo_jax.tokenizer import Tokenizer
from dqo_jax.train.forward import response_logprobs


def prompts_per_call(batch_size: int, samples_per_prompt: int, mesh) -> int:
  """Prompts per `generate` call for about `batch_size` decoded rows: a multiple of the devices
  the batch is split over, at least one per device."""
  per_device = max(1, batch_size // samples_per_prompt // sharding.batch_rows(mesh))
  return per_device * sharding.batch_rows(mesh)


def generate_all(
    model: Transformer,
    params,
    prompt: np.ndarray,
    prompt_mask: np.ndarray,
    rng,
    *,
    tok: Tokenizer,
    mesh,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    samples_per_prompt: int = 1,
    width_multiple: int = 16,
    refill_rows: int = 0,
    desc: str = "generate",
) -> Samples:
  """Runs `generate` over all N prompts in fixed-size batches (the last one padded) -> numpy
  Samples of N * K rows, prompt-major (row i * K + j: sample j of prompt i).

  With K = `samples_per_prompt` > 1 each prompt is prefilled once and decoded K times
  (`generate`'s shared prefix); `batch_size` counts decoded rows, so a call takes
  batch_size // K prompts (at least one per device of the batch axes).

  `width_multiple` > 0: a batch's prompts lose the leading columns that are padding in every
  row, rounded to a multiple of it (one compiled program per width that occurs): the prefill
  and every decode step's attention then span fewer slots. 0: every batch at the full width.

  `refill_rows` = C > 0: refilled decode slots instead of batches (`_generate_refilled`).
  """
  if refill_rows > 0:
    return _generate_refilled(
        model,
        params,
        prompt,
        prompt_mask,
        rng,
        tok=tok,
        mesh=mesh,
        rows=batch_size,
        refill_rows=refill_rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        greedy=greedy,
        samples_per_prompt=samples_per_prompt,
        width_multiple=width_multiple,
        desc=desc,
    )
  k = samples_per_prompt
  n = prompt.shape[0]
  per_call = prompts_per_call(batch_size, k, mesh)
  outs = []
  for start in tqdm(range(0, n, per_call), desc=desc, leave=False):
    idx = np.arange(start, start + per_call) % n  # wrap: one static shape for every batch
    cols = _used_columns(prompt_mask[idx], width_multiple)
    rng, key = jax.random.split(rng)
    s = generate(
        model,
        params,
        *sharding.put_batch((prompt[idx, cols], prompt_mask[idx, cols]), mesh),
        key,
        max_new_tokens=max_new_tokens,
        eos_id=tok.eos_id,
        stop_ids=tuple(tok.stop_ids),
        pad_id=tok.pad_id,
        temperature=temperature,
        greedy=greedy,
        samples_per_prompt=k,
    )
    keep = min(per_call, n - start) * k
    outs.append(jax.tree.map(lambda x: x[:keep], distributed.fetch(s)))
  return Samples(*(np.concatenate(parts) for parts in zip(*outs)))


def _used_columns(prompt_mask: np.ndarray, multiple: int) -> slice:
  """The last columns of left-padded prompts that hold a token in some row, as a multiple of
  `multiple` (0: all columns)."""
  if multiple <= 0:
    return slice(0, None)
  used = prompt_mask.shape[1] - int(np.argmax(prompt_mask.any(0)))
  return slice(-min(-(-used // multiple) * multiple, prompt_mask.shape[1]), None)


def slot_shape(batch_size: int, refill_rows: int, samples_per_prompt: int, mesh):
  """(rows of the refilled decode slots, prompts per refill) for `batch_size` rows refilled
  about `refill_rows` at a time: at least one refill's rows, split evenly over the devices."""
  per_refill = prompts_per_call(refill_rows, samples_per_prompt, mesh)
  rows = max(batch_size, per_refill * samples_per_prompt)
  return -(-rows // sharding.batch_rows(mesh)) * sharding.batch_rows(mesh), per_refill


def _generate_refilled(
    model,
    params,
    prompt,
    prompt_mask,
    rng,
    *,
    tok,
    mesh,
    rows,
    refill_rows,
    max_new_tokens,
    temperature,
    greedy,
    samples_per_prompt,
    width_multiple,
    desc,
) -> Samples:
  """`generate_all` over refilled decode slots (sampler.Slots): `rows` rows decode at once;
  whenever `refill_rows` of them have ended, the host collects them and the next prompts are
  prefilled into them (K rows per prompt, prompt-major like the batches). Same outputs as the
  batches for greedy decoding; sampled rows draw other random numbers, from the same
  distribution."""
  k, n = samples_per_prompt, prompt.shape[0]
  cols = _used_columns(prompt_mask, width_multiple)  # one width for the whole call
  prompt, prompt_mask = prompt[:, cols], prompt_mask[:, cols]
  rows, per_refill = slot_shape(rows, refill_rows, k, mesh)
  c = per_refill * k
  # Made by a jitted program with the slots' shardings: with several processes no host holds
  # the whole array (device_put of a global sharding would fail there).
  make = functools.partial(
      sampler.empty_slots, model, rows, prompt.shape[1], max_new_tokens, width=1
  )
  shape = jax.eval_shape(make, rng)
  placement = jax.tree.map(lambda _: sharding.batch_sharding(mesh), shape._replace(rng=None))
  slots = jax.jit(make, out_shardings=placement._replace(rng=sharding.replicated(mesh)))(rng)
  stop = dict(eos_id=tok.eos_id, stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id)
  out = Samples(
      np.full((n * k, max_new_tokens), tok.pad_id, np.int32),
      np.zeros((n * k, max_new_tokens), np.float32),
      np.zeros((n * k,), np.int32),
      np.zeros((n * k,), np.int32),
  )
  owner = np.full(rows, -1)  # the request (prompt * K + sample) each row serves
  queued = 0  # prompts started
  bar = tqdm(total=n * k, desc=desc, leave=False)
  while True:
    ended = (owner >= 0) & distributed.fetch(slots.done)
    if ended.any():
      toks, lps, ends = distributed.fetch((slots.toks, slots.lps, slots.ends))
      r = np.flatnonzero(ended)
      for buf, new in zip(out, (toks[r], lps[r], ends[r, 1], ends[r, 0])):
        buf[owner[r]] = new
      owner[r] = -1
      bar.update(len(r))
    free = np.flatnonzero(owner < 0)
    while queued < n and len(free) >= c:
      idx = np.arange(queued, queued + per_refill)
      real = np.repeat(idx < n, k)
      targets = np.where(real, free[:c], rows)  # a copy of a wrapped prompt is dropped
      slots = sampler.refill_slots(
          model,
          params,
          slots,
          *sharding.put_batch((prompt[idx % n], prompt_mask[idx % n]), mesh),
          targets.astype(np.int32),  # the same on every process
          pad_id=tok.pad_id,
          samples_per_prompt=k,
      )
      owner[targets[real]] = (idx[:, None] * k + np.arange(k)).reshape(-1)[real]
      free, queued = free[c:], queued + per_refill
    if queued >= n and (owner < 0).all():
      break
    # Until C rows are free for the next prompts, or, with none left, until every row is done.
    min_done = c if queued < n else rows
    slots = sampler.decode_slots(
        model, params, slots, min_done, temperature=temperature, greedy=greedy, **stop
    )
  bar.close()
  return out


def response_texts(tok: Tokenizer, samples: Samples) -> list[str]:
  return [tok.decode(t[:l]) for t, l in zip(samples.tokens, samples.lengths)]


def grade_samples(
    task: str, tok: Tokenizer, samples: Samples, references: list[str], reward_cfg
) -> tuple[list[str], list[rewards.Grade], np.ndarray]:
  """Texts, grades and rewards; a response cut at the length limit gets the unparseable reward."""
  texts = response_texts(tok, samples)
  grades = rewards.grade_batch(task, texts, references)
  r = np.array(
      [
          reward_cfg.unparseable
          if finish == FINISH_LENGTH
          else rewards.reward_for(
              g,
              correct=reward_cfg.correct,
              incorrect=reward_cfg.incorrect,
              unparseable=reward_cfg.unparseable,
          )
          for g, finish in zip(grades, samples.finish)
      ],
      np.float32,
  )
  return texts, grades, r


def accuracy_by_steps(correct: np.ndarray, num_steps: np.ndarray) -> dict:
  """Overall accuracy and accuracy per number of reasoning steps."""
  groups = defaultdict(list)
  for c, s in zip(correct, num_steps):
    groups[int(s)].append(bool(c))
  return dict(
      accuracy=float(np.mean(correct)) if len(correct) else 0.0,
      by_steps={str(s): float(np.mean(v)) for s, v in sorted(groups.items())},
      n=int(len(correct)),
  )


@functools.cache
def logprobs_program(model):
  """The jitted reference log-prob pass of `model` (params, batch) -> [B, R]; one compilation
  per model and batch shape, however often the monitor calls it."""
  return jax.jit(functools.partial(response_logprobs, model))


def logprobs_of(
    model: Transformer, params, prompt, prompt_mask, response, response_len, *, mesh, batch_size
) -> np.ndarray:
  """log pi(a_t|s_t) of every token of given responses, [N, R], with the training code's forward
  pass, `batch_size` rows at a time (the last batch wrapped around to full size)."""
  fn = logprobs_program(model)
  n, out = prompt.shape[0], []
  for start in tqdm(range(0, n, batch_size), desc="reference log-probs", leave=False):
    idx = np.arange(start, start + batch_size) % n
    batch = dict(
        prompt=prompt[idx],
        prompt_mask=prompt_mask[idx],
        response=response[idx],
        response_len=response_len[idx],
    )
    logp = distributed.fetch(fn(params, sharding.put_batch(batch, mesh)))
    out.append(logp[: min(batch_size, n - start)])
  return np.concatenate(out)
