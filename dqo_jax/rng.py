"""Named random streams: every random draw of a run comes from `config.seed` and the name of what
draws it, so that two stages never share numbers and a new stream changes no other.

A stream's number is the CRC-32 of its name (stable across Python processes and versions, unlike
`hash`), folded into the seed: `jax.random.fold_in` for JAX keys, NumPy's SeedSequence for the
host-side orders (batches, DPO's pair subsets).
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

# What draws random numbers, by stage.
STREAMS = (
    "sft.init",  # the policy's initial parameters (a model trained from scratch)
    "sft.batches",  # SFT's batch order
    "sft.lora_dropout",  # SFT's adapter dropout masks (folded with the step)
    "sample",  # the sample stage's responses
    "rollouts",  # the rollouts stage's Monte-Carlo continuations
    "train.init",  # the value head (and any fresh parameter) of the train stage
    "train.batches",  # the train stage's batch order and the views' subsets
    "train.lora_dropout",  # the train stage's adapter dropout masks (folded with the step)
    "rounds.sample",  # with train.rounds > 1: round r's samples (folded with r)
    "rounds.init",  # with train.rounds > 1: round r's fresh value head (folded with r)
    "monitor.objective",  # the samples of E[R] - beta KL while training (folded with the step)
    "eval.sampled",  # temperature samples of the accuracy, pass@k and maj@k
    "eval.objective",  # the samples of E[R] - beta KL at evaluation
)


def _number(stream: str) -> int:
  if stream not in STREAMS:
    raise ValueError(f"unknown random stream {stream!r}; add it to dqo_jax.rng.STREAMS")
  return zlib.crc32(stream.encode())


def key(seed: int, stream: str) -> jax.Array:
  """The JAX key of `stream` under `seed`."""
  return jax.random.fold_in(jax.random.key(seed), _number(stream))


def numpy_seed(seed: int, stream: str) -> int:
  """An integer seed for NumPy's generators, of `stream` under `seed`."""
  return int(np.random.SeedSequence([seed, _number(stream)]).generate_state(1)[0])
