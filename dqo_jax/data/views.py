"""What each method trains on, as views over the one offline dataset (`data/offline.py`).

Every method reads the same sampled, verified responses; only the selection differs:

* SFT: the gold solutions (the SFT data itself).
* RFT: the gold solutions plus the verified-correct samples, deduplicated per prompt by their
  sequence of equations.
* DPO: pairs (correct, incorrect) of responses to one prompt, all of them, capped per prompt.
* KTO: every sample with its label, each paired with the response of a different prompt for the
  z0 estimate.
* DRO and DQO: every sample with its reward; DQO with process supervision adds Phi(s_t).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from dqo_jax.data.batches import Encoded
from dqo_jax.errors import UserError

TOKEN_KEYS = ("prompt", "prompt_mask", "response", "response_len")


def is_success(record: dict) -> bool:
  return bool(record["correct"]) and record["finish"] == "eos"


def rft_selection(records: list[dict], known: Encoded | None, equations) -> list[int]:
  """Indices of the correct samples whose equations (`equations(text)`, the task's) differ from
  every earlier kept sample's for the same prompt and, where `known` holds the sampled prompts'
  gold solutions (indexed by `prompt_index`; None when only their answers are known), from the
  gold solution's."""
  seen = defaultdict(set)
  keep = []
  for i, r in enumerate(records):
    p = r["prompt_index"]
    if not seen[p] and known is not None:
      seen[p].add(equations(known.examples[p]["solution"]))
    key = equations(r["text"])
    if is_success(r) and key not in seen[p]:
      seen[p].add(key)
      keep.append(i)
  return keep


def rft_arrays(
    records: list[dict], sample_arrays: dict, gold: Encoded, known: Encoded | None, equations
) -> dict[str, np.ndarray]:
  """The gold solutions SFT read followed by the kept correct samples (`rft_selection`), in the
  token batch layout."""
  keep = np.array(rft_selection(records, known, equations), np.int64)
  return {k: np.concatenate([gold.arrays[k], sample_arrays[k][keep]]) for k in TOKEN_KEYS}


def _by_prompt(records: list[dict]) -> dict[int, list[int]]:
  groups = defaultdict(list)
  for i, r in enumerate(records):
    groups[r["prompt_index"]].append(i)
  return groups


def dpo_pairs(records: list[dict], max_pairs_per_prompt: int, seed: int) -> np.ndarray:
  """[P, 2] sample indices (chosen, rejected): every correct x incorrect pair of a prompt, a
  seeded random subset of `max_pairs_per_prompt` where there are more (<= 0: no cap)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for p, idx in sorted(_by_prompt(records).items()):
    good = [i for i in idx if is_success(records[i])]
    bad = [i for i in idx if not is_success(records[i])]
    prompt_pairs = [(g, b) for g in good for b in bad]
    if 0 < max_pairs_per_prompt < len(prompt_pairs):
      chosen = rng.choice(len(prompt_pairs), max_pairs_per_prompt, replace=False)
      prompt_pairs = [prompt_pairs[j] for j in sorted(chosen)]
    pairs += prompt_pairs
  if not pairs:
    raise UserError(
        "no prompt has both a correct and an incorrect sample: DPO has no pairs; "
        "sample more responses per prompt (sample.samples_per_prompt)"
    )
  return np.array(pairs, np.int64)


def mismatched_partners(records: list[dict]) -> np.ndarray:
  """For sample i, the index of a sample of a *different* prompt (KTO's z0 estimate): the r-th
  sample of a prompt is paired with the r-th (cyclically) of the next prompt."""
  groups = [idx for _, idx in sorted(_by_prompt(records).items())]
  if len(groups) < 2:
    raise UserError("KTO needs samples of at least two prompts for its z0 estimate")
  partner = np.empty(len(records), np.int64)
  for g, idx in enumerate(groups):
    following = groups[(g + 1) % len(groups)]
    for r, i in enumerate(idx):
      partner[i] = following[r % len(following)]
  return partner


def boundary_potentials(
    boundaries: list[int], potentials: list[float], length: int, width: int
) -> np.ndarray:
  """Phi(s_t) for t < width: p_j for b_j < t <= b_{j+1} (p_0 up to the first boundary), 0 from
  the terminal state on. [width] float32."""
  t = np.arange(width)
  j = np.searchsorted(np.asarray(boundaries, np.int64), t, side="left")  # #{b_j < t}
  phi = np.asarray(potentials, np.float32)[np.minimum(j, len(potentials) - 1)]
  return np.where(t < length, phi, 0.0).astype(np.float32)


def process_arrays(potential_records: list[dict], response_len: np.ndarray, width: int) -> dict:
  """The per-token arrays process supervision adds to the DQO batch.

  potentials: [N, width] Phi(s_t). boundary_mask: [N, width] 1 at s_0 and at every state that
  follows a step delimiter: where the Monte-Carlo estimate p_j is the state's own value.
  """
  phi = np.stack(
      [
          boundary_potentials(r["boundaries"], r["potentials"], int(n), width)
          for r, n in zip(potential_records, response_len)
      ]
  )
  at_boundary = np.zeros_like(phi)
  for i, r in enumerate(potential_records):
    states = [0] + [b + 1 for b in r["boundaries"] if b + 1 < response_len[i]]
    at_boundary[i, states] = 1.0
  return dict(potentials=phi, boundary_mask=at_boundary)
