"""Reading and writing safetensors files one tensor at a time, bfloat16 included.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian data. Reading a tensor reads exactly
its bytes into one fresh numpy array (no memory map stays resident, no other tensor is touched);
writing streams tensors produced one at a time. numpy has no bfloat16, so it comes from
`ml_dtypes` (which JAX uses too); the `safetensors` package's numpy reader refuses bf16 files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsFile:
  """The header of one file; `read(name)` loads one tensor."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path}: not a safetensors file (truncated header)")
      (n,) = struct.unpack("<Q", raw)
      header = json.loads(f.read(n))
    self._data_start = 8 + n
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries = header

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _dtype(self.entries[name]["dtype"], self.path)

  def read(self, name: str) -> np.ndarray:
    e = self.entries[name]
    dtype, shape = _dtype(e["dtype"], self.path), tuple(e["shape"])
    begin, end = e["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name} has {end - begin} bytes for {shape} {dtype}")
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      out = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count)
    if out.size != count:
      raise ValueError(f"{self.path}: tensor {name} is truncated")
    return out.astype(dtype, copy=False).reshape(shape)


def _dtype(name: str, path: str) -> np.dtype:
  if name not in DTYPES:
    raise ValueError(f"{path}: tensor dtype {name} is not supported")
  return DTYPES[name]


def checkpoint_files(directory: str | os.PathLike) -> dict[str, str]:
  """{tensor name: file path} of a Hugging Face checkpoint directory (single file or sharded).

  Raises FileNotFoundError with a one-line message naming what is missing.
  """
  directory = os.fspath(directory)
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise FileNotFoundError(
          f"{directory}: missing {len(missing)} of {len(files)} shards listed in {INDEX}: "
          + ", ".join(missing[:3])
          + (" ..." if len(missing) > 3 else "")
      )
    return {name: os.path.join(directory, f) for name, f in weight_map.items()}
  single = os.path.join(directory, SINGLE)
  if os.path.isfile(single):
    return {name: single for name in SafetensorsFile(single).keys()}
  raise FileNotFoundError(f"{directory}: no {SINGLE} and no {INDEX}")


def iter_tensors(names_to_files: dict[str, str]) -> Iterator[tuple[str, SafetensorsFile]]:
  """(name, file) for every tensor, file by file, each file's header parsed once."""
  by_file: dict[str, list[str]] = {}
  for name, path in names_to_files.items():
    by_file.setdefault(path, []).append(name)
  for path, names in by_file.items():
    f = SafetensorsFile(path)
    for name in names:
      if name not in f.entries:
        raise ValueError(f"{path}: tensor {name} listed in the index is not in the file")
      yield name, f


Spec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(path: str | os.PathLike, specs: Iterable[Spec], metadata=None) -> None:
  """Writes tensors (name, shape, dtype, produce) calling each `produce()` only when its bytes
  are written, so at most one tensor is in host memory."""
  specs = list(specs)
  header, offset = {}, 0
  for name, shape, dtype, _ in specs:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = dict(
        dtype=_NAMES[np.dtype(dtype)], shape=list(shape), data_offsets=[offset, offset + size]
    )
    offset += size
  header = {"__metadata__": dict(metadata or {"format": "pt"})} | header
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, produce in specs:
      arr = np.ascontiguousarray(produce(), dtype=np.dtype(dtype).newbyteorder("<"))
      if arr.shape != tuple(shape):
        raise ValueError(f"tensor {name}: produced {arr.shape}, declared {tuple(shape)}")
      f.write(arr.reshape(-1).view(np.uint8).data)
      del arr
  os.replace(tmp, path)


def write_checkpoint(
    directory: str | os.PathLike, specs: Iterable[Spec], max_shard_bytes: int = 2 << 30
) -> list[str]:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
  `max_shard_bytes` (a larger tensor gets a shard of its own) plus the index. Returns the files."""
  directory = os.fspath(directory)
  shards: list[list[Spec]] = [[]]
  size = 0
  total = 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
    total += nbytes
  if len(shards) == 1:
    write_file(os.path.join(directory, SINGLE), shards[0])
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    write_file(os.path.join(directory, name), shard)
    weight_map.update({spec[0]: name for spec in shard})
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2)
  return names + [INDEX]
