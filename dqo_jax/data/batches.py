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


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of batch `step`: epochs are seeded permutations, so any step can be recomputed."""
  if num_examples < batch_size:
    raise ValueError(
        f"{num_examples} examples cannot fill one batch of {batch_size}; "
        "lower the batch size or add data"
    )
  per_epoch = num_examples // batch_size
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[i * batch_size : (i + 1) * batch_size]


def take(arrays: dict[str, np.ndarray], idx: np.ndarray, keys=None) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in arrays.items() if keys is None or k in keys}
