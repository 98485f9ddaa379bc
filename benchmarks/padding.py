"""Padding with and without length bucketing, on GSM8K's gold-solution length distribution.

Lengths are approximated by whitespace-separated words plus one EOS (no tokenizer needed; a
subword tokenizer stretches lengths roughly uniformly, which leaves the fractions comparable).
"Before" pads every batch to the longest solution (rounded up to 8), the tightest fixed
`data.max_response_len`; "after" is the training view's bucketing with configs/gsm8k.py's
`train.batch_size` and `train.length_buckets`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks.timing import row
from configs import gsm8k
from dqo_jax.data.batches import bucket_widths, bucketed_batch_indices, cut_to_width


def gsm8k_lengths(path: str) -> np.ndarray:
  with open(path, encoding="utf-8") as f:
    return np.array([len(json.loads(line)["answer"].split()) + 1 for line in f], np.int64)


def padding_fractions(lengths, batch_size, num_buckets, steps, seed=0):
  """Fractions of padded response slots over `steps` batches: one fixed width, then bucketed;
  and the bucket widths."""
  max_len = int(-(-lengths.max() // 8) * 8)
  widths = bucket_widths(lengths, num_buckets, max_len)
  real = fixed = bucketed = 0
  for step in range(steps):
    idx = bucketed_batch_indices(lengths, widths, batch_size, step, seed)
    batch = cut_to_width(dict(response=np.zeros((batch_size, max_len))), widths, lengths[idx].max())
    real += lengths[idx].sum()
    fixed += batch_size * max_len
    bucketed += batch["response"].size
  return 1 - real / fixed, 1 - real / bucketed, widths


def rows(quick: bool) -> list[dict]:
  train = gsm8k.get_config().train
  lengths = gsm8k_lengths(os.path.join(gsm8k.GSM8K_DIR, "train.jsonl"))
  epochs = 1 if quick else 3
  steps = len(lengths) // train.batch_size * epochs
  before, after, widths = padding_fractions(lengths, train.batch_size, train.length_buckets, steps)
  return [
      row(
          "padding fraction GSM8K train",
          float(after),
          baseline=float(before),
          target=0.10,
          unit="fraction",
          notes=(
              f"ours: {train.length_buckets} buckets {widths.tolist()}, baseline: fixed width "
              f"{int(widths[-1])}; {len(lengths)} gold solutions, length = words + EOS "
              f"(whitespace approximation, not a tokenizer); batch {train.batch_size}, "
              f"{epochs} epoch(s)"
          ),
      )
  ]
