"""Named random streams (dqo_jax/rng.py): distinct per stream and seed, the same in every process."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from dqo_jax import rng


def test_streams_and_seeds_draw_different_numbers():
  draws = {
      (seed, s): tuple(np.asarray(jax.random.bits(rng.key(seed, s), (4,))))
      for seed in (0, 1)
      for s in rng.STREAMS
  }
  assert len(set(draws.values())) == len(draws)
  seeds = {(seed, s): rng.numpy_seed(seed, s) for seed in (0, 1) for s in rng.STREAMS}
  assert len(set(seeds.values())) == len(seeds)


def test_a_stream_is_the_same_in_another_process():
  code = "from dqo_jax import rng; print(rng.numpy_seed(3, 'sample'))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert int(out.stdout) == rng.numpy_seed(3, "sample")


def test_an_unknown_stream_is_refused():
  with pytest.raises(ValueError, match="add it to dqo_jax.rng.STREAMS"):
    rng.key(0, "sampel")
