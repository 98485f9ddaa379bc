"""TensorBoard scalars (through tensorboardX: no TensorFlow needed) and stage summaries."""

from __future__ import annotations

import json
import os

import numpy as np
from tensorboardX import SummaryWriter


class ScalarWriter:
  """Writes scalars to `<stage_dir>/tb`; one event file per process start."""

  def __init__(self, stage_dir: str):
    self._writer = SummaryWriter(os.path.join(stage_dir, "tb"))

  def write(self, step: int, scalars: dict[str, float]):
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    self._writer.flush()

  def close(self):
    self._writer.close()


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device arrays fetched once, here)."""
  return {k: float(np.mean([np.asarray(m[k]) for m in history])) for k in history[0]}


def write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
