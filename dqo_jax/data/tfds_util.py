"""What the project's TFDS datasets share: array_record files, read back without TensorFlow."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

FILE_FORMAT = "array_record"


@contextlib.contextmanager
def progress_bars_disabled():
  # TFDS only exposes a global on/off switch, so restore whatever was set.
  previous = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


def prepare_and_read(
    builder: tfds.core.DatasetBuilder, decode: Callable[[dict], dict], splits: Iterable[str]
) -> dict[str, list[dict]]:
  """Prepares `builder` (a no-op when already prepared) and returns its splits, decoded."""
  with progress_bars_disabled():
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return {split: [decode(ex) for ex in builder.as_data_source(split)] for split in splits}


def files_digest(root: str | os.PathLike, relpaths: Iterable[str], length: int = 10) -> str:
  """A short hash of the names and contents of files under `root`: names a BuilderConfig, so
  that a changed local copy is prepared afresh instead of silently reusing stale files."""
  h = hashlib.sha256()
  for rel in sorted(relpaths):
    h.update(rel.encode() + b"\0")
    with open(os.path.join(root, rel), "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:length]


def text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
