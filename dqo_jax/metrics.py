"""TensorBoard scalars (through tensorboardX: no TensorFlow needed) and stage summaries."""

from __future__ import annotations

import json
import os

import numpy as np
from tensorboardX import SummaryWriter

from dqo_jax.distributed import is_writer


class ScalarWriter:
  """Writes scalars to `<stage_dir>/tb`; one event file per run start (none off process 0)."""

  def __init__(self, stage_dir: str):
    self._writer = SummaryWriter(os.path.join(stage_dir, "tb")) if is_writer() else None

  def write(self, step: int, scalars: dict[str, float]):
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device arrays fetched once, here)."""
  return {k: float(np.mean([np.asarray(m[k]) for m in history])) for k in history[0]}


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON on process 0 (the others' results are the same)."""
  if not is_writer():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files of `tb_dir`, as {tag: [(step, value), ...]}.

  Reads the TFRecord framing directly (8-byte length, 4-byte CRC, payload, 4-byte CRC), so
  plots and tests need neither TensorFlow nor TensorBoard.
  """
  import struct
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    if not name.startswith("events"):
      continue
    with open(os.path.join(tb_dir, name), "rb") as f:
      while header := f.read(12):
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        for v in event.summary.value:
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out
