"""Token arrays in the project's batch layout and deterministic, resumable batch order.

Prompts are left padded to `max_prompt_len`, responses right padded to `max_response_len`.
An example that does not fit is dropped and counted, never truncated: a truncated response
would turn into a false terminal state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dqo_jax.tokenizer import Tokenizer


def prompt_text(question: str) -> str:
  """The default prompt: the question and a newline (see `dqo_jax.data.prompts` for others)."""
  return question + "\n"


def encode_prompt(
    tok: Tokenizer, question: str, prompt_fn: Callable[[str], str] = prompt_text
) -> list[int]:
  ids = tok.encode(prompt_fn(question))
  # Qwen has no BOS (`add_bos` False); every other tokenizer here starts prompts with one,
  # unless the text already begins with it (a chat template writes its own BOS).
  bos = getattr(tok, "add_bos", True) and (not ids or ids[0] != tok.bos_id)
  return [tok.bos_id] * bos + ids


def encode_response(tok: Tokenizer, solution: str) -> list[int]:
  return tok.encode(solution) + [tok.eos_id]


def left_pad(seqs: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if s:
      tokens[i, -len(s) :] = s
      mask[i, -len(s) :] = 1
  return tokens, mask


def right_pad(seqs: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
  return tokens, np.array([len(s) for s in seqs], np.int32)


@dataclasses.dataclass
class Encoded:
  """Examples that fit the length limits, as arrays, plus how many were dropped."""

  arrays: dict[str, np.ndarray]
  examples: list[dict]
  dropped: int

  def __len__(self):
    return len(self.examples)

  def rows(self, start: int, stop: int | None = None) -> "Encoded":
    """The examples [start, stop) as an Encoded of their own (`dropped` is the whole set's)."""
    sl = slice(start, stop)
    arrays = {k: v[sl] for k, v in self.arrays.items()}
    return Encoded(arrays, self.examples[sl], self.dropped)


def encode_examples(
    tok: Tokenizer,
    examples: list[dict],
    max_prompt_len: int,
    max_response_len: int,
    prompt_fn: Callable[[str], str] = prompt_text,
) -> Encoded:
  """Encodes question/solution examples into prompt and gold-response arrays; `prompt_fn`
  renders a question into the prompt text (`dqo_jax.data.prompts.make_renderer`)."""
  kept, prompts, responses = [], [], []
  for ex in examples:
    p = encode_prompt(tok, ex["question"], prompt_fn)
    r = encode_response(tok, ex["solution"])
    if len(p) <= max_prompt_len and len(r) <= max_response_len:
      kept.append(ex)
      prompts.append(p)
      responses.append(r)
  prompt, prompt_mask = left_pad(prompts, max_prompt_len, tok.pad_id)
  response, response_len = right_pad(responses, max_response_len, tok.pad_id)
  arrays = dict(
      prompt=prompt,
      prompt_mask=prompt_mask,
      response=response,
      response_len=response_len,
      # The group evaluation reports accuracy by (optional; 0 when absent).
      num_steps=np.array([ex.get("num_steps", 0) for ex in kept], np.int32),
  )
  return Encoded(arrays, kept, len(examples) - len(kept))


def _check_fills_a_batch(num_examples: int, batch_size: int) -> None:
  if num_examples < batch_size:
    raise ValueError(
        f"{num_examples} examples cannot fill one batch of {batch_size}; "
        "lower the batch size or add data"
    )


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of batch `step`: epochs are seeded permutations, so any step can be recomputed."""
  _check_fills_a_batch(num_examples, batch_size)
  per_epoch = num_examples // batch_size
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[i * batch_size : (i + 1) * batch_size]


def take(arrays: dict[str, np.ndarray], idx: np.ndarray, keys=None) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in arrays.items() if keys is None or k in keys}


# ----------------------------------------------------------------------------
# Length bucketing: batches of similar response lengths, cut to one of a few widths.

# The arrays laid out along the response, [N, max_response_len]; cut together to a bucket width.
RESPONSE_KEYS = ("response", "behaviour_logprobs", "ref_logprobs", "potentials", "boundary_mask")


def bucket_widths(lengths: np.ndarray, num_buckets: int, max_len: int, multiple: int = 8):
  """At most `num_buckets` response widths, multiples of `multiple` (or `max_len`), that minimise
  the padding of `lengths` when each example is padded to the narrowest width that holds it.

  An exact dynamic programme over the candidate widths (the rounded-up lengths), O(k U^2) for U
  <= max_len / multiple candidates. One width per bucket bounds the train step's compilations.
  """
  rounded = np.minimum(-(-lengths // multiple) * multiple, max_len)
  cand, group = np.unique(rounded, return_inverse=True)
  count = np.concatenate([[0], np.cumsum(np.bincount(group))])
  total = np.concatenate([[0.0], np.cumsum(np.bincount(group, weights=lengths))])
  u = len(cand)
  i, j = np.meshgrid(np.arange(u + 1), np.arange(u + 1), indexing="ij")
  # pad[i, j]: the padding of candidate groups i..j-1 padded to cand[j - 1] (inf unless i < j)
  last = cand[np.maximum(j - 1, 0)]
  pad = np.where(i < j, last * (count[j] - count[i]) - (total[j] - total[i]), np.inf)
  # cost[b, j]: the least padding of groups 0..j-1 in b buckets; prev[b, j]: where its last starts
  cost = np.full((num_buckets + 1, u + 1), np.inf)
  cost[0, 0] = 0.0
  prev = np.zeros((num_buckets + 1, u + 1), np.int64)
  for b in range(1, num_buckets + 1):
    options = cost[b - 1][:, None] + pad
    prev[b], cost[b] = np.argmin(options, axis=0), np.min(options, axis=0)
  b, j, widths = int(np.argmin(cost[:, u])), u, []
  while j:
    widths.append(int(cand[j - 1]))
    b, j = b - 1, prev[b, j]
  return np.array(widths[::-1], np.int64)


def bucketed_batch_indices(
    lengths: np.ndarray, widths: np.ndarray, batch_size: int, step: int, seed: int
) -> np.ndarray:
  """Indices of batch `step`, drawn from the same epoch permutation as `batch_indices` but
  grouped by bucket: each epoch's examples are stably sorted by the width that holds them (so
  in random order within a bucket), cut into batches, and the batches visited in a seeded order.
  At most len(widths) - 1 batches straddle two buckets. A pure function of `step`, as resuming
  needs."""
  n = len(lengths)
  _check_fills_a_batch(n, batch_size)
  per_epoch = n // batch_size
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)[: per_epoch * batch_size]
  order = order[np.argsort(np.searchsorted(widths, lengths[order]), kind="stable")]
  k = np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)[i]
  return order[k * batch_size : (k + 1) * batch_size]


def cut_to_width(batch: dict[str, np.ndarray], widths: np.ndarray, length: int) -> dict:
  """The batch with its response arrays cut to the narrowest width that holds `length` tokens."""
  width = int(widths[np.searchsorted(widths, length)])
  return {k: v[:, :width] if k in RESPONSE_KEYS else v for k, v in batch.items()}


def batch_fn(arrays, n, batch_size, seed, num_buckets, rows=lambda idx: idx):
  """batch_at over `n` examples; rows(idx) maps example indices to rows of `arrays` (any
  shape: [B] or [B, 2] for pairs, laid out as the first then the second of each).

  num_buckets > 1: batches of similar response lengths (a pair counts as its longer response),
  their response arrays cut to one of at most `num_buckets` widths (`bucket_widths`); 1: batches
  in plain epoch order, cut to the multiple of 8 that holds their longest response."""
  flat = lambda idx: idx.T.reshape(-1) if idx.ndim == 2 else idx
  example_rows = rows(np.arange(n))
  lengths = arrays["response_len"][example_rows]
  lengths = lengths.max(axis=1) if lengths.ndim == 2 else lengths
  max_len = arrays["response"].shape[1]
  if num_buckets <= 1:
    # Plain shuffled epochs, cut to the multiple of 8 that holds the batch's longest response:
    # the columns cut are padding after every response, which nothing earlier attends to and no
    # loss reads, so the step computes the same values on fewer columns.
    widths = np.minimum(np.arange(8, max_len + 8, 8), max_len)
    indices = lambda i: batch_indices(n, batch_size, i, seed)
  else:
    widths = bucket_widths(lengths, num_buckets, max_len)
    indices = lambda i: bucketed_batch_indices(lengths, widths, batch_size, i, seed)

  def batch_at(i):
    idx = indices(i)
    return cut_to_width(take(arrays, flat(example_rows[idx])), widths, lengths[idx].max())

  return batch_at
