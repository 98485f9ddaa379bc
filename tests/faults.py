"""Faults the reliability tests inject: damage to a checkpoint's bytes, in place."""

from __future__ import annotations

import os
import random


def data_files(step_dir) -> list[str]:
  """The files of a local checkpoint step that hold its arrays' bytes (TensorStore's OCDBT data
  files, `d/<hash>`, of the state and its digest), sorted."""
  return sorted(
      os.path.join(d, f)
      for d, _, files in os.walk(step_dir)
      if os.path.basename(d) == "d"
      for f in files
  )


def overwrite(data: bytearray, rng: random.Random, n: int = 64) -> int:
  """Overwrites `n` bytes of `data` at a random offset with random bytes, at least one of them
  changed, keeping its size; returns the offset."""
  n = min(n, len(data))
  offset = rng.randrange(len(data) - n + 1)
  new = bytes(rng.randrange(256) for _ in range(n))
  if new == data[offset : offset + n]:
    new = bytes([new[0] ^ 0xFF]) + new[1:]
  data[offset : offset + n] = new
  return offset


def damage_in_place(step_dir, rng: random.Random, n: int = 64) -> tuple[str, int]:
  """Overwrites `n` random bytes of one data file of a local checkpoint step, chosen with
  probability proportional to its size (so every byte of the arrays is as likely); returns
  (file, offset)."""
  files = data_files(step_dir)
  (path,) = rng.choices(files, weights=[os.path.getsize(f) for f in files])
  with open(path, "rb") as f:
    data = bytearray(f.read())
  offset = overwrite(data, rng, n)
  with open(path, "r+b") as f:  # in place: the same file, the same size
    f.write(data)
  return path, offset
