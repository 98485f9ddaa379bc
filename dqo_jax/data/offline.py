"""The offline dataset of sampled, verified responses: JSON records in an array_record file.

One record per sample: prompt and response token ids (unpadded; the response ends with EOS
unless it was cut at the length limit), the behaviour policy's log-probs of the sampled tokens,
the reference policy's log-probs (recomputed with the training forward pass), the reward, and
what the verifier saw. JSON, not pickle: a dataset received from elsewhere is only data.
"""

from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from dqo_jax.data.batches import left_pad, right_pad
from dqo_jax.data.views import is_success
from dqo_jax.distributed import is_writer
from dqo_jax.errors import UserError

FIELDS = (
    "prompt_index",
    "prompt",
    "response",
    "behaviour_logprobs",
    "ref_logprobs",
    "reward",
    "correct",
    "predicted",
    "finish",
    "num_steps",
    "text",
)


def write_records(path: str, records: list[dict], fields=FIELDS) -> None:
  """Writes atomically (a reader never sees a half-written file), on process 0 only."""
  if not is_writer():
    return
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for rec in records:
    missing = set(fields) - rec.keys()
    if missing:
      raise ValueError(f"offline record lacks {sorted(missing)}")
    writer.write(json.dumps(rec).encode())
  writer.close()
  os.replace(tmp, path)


def read_records(path: str, stage: str = "sample", fields=()) -> list[dict]:
  """The records `stage` wrote to `path`; UserError, naming the file and the fix, for a file
  that is missing, unreadable, or holds a record without one of `fields`."""
  redo = f"run the {stage!r} stage again with --redo={stage}"
  if not os.path.exists(path):
    if os.path.exists(os.path.join(os.path.dirname(path), "DONE.json")):
      raise UserError(f"{path} not found, although the {stage!r} stage is marked done; {redo}")
    raise UserError(f"{path} not found: run the {stage!r} stage first")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      raw = reader.read_all()
    finally:
      reader.close()
  except RuntimeError as e:  # array_record's error for an empty, truncated or corrupted file
    raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:120]}); {redo}") from None
  records = []
  for i, r in enumerate(raw):
    try:
      rec = json.loads(r)
    except ValueError:  # invalid JSON or UTF-8
      rec = None
    if not isinstance(rec, dict):
      raise UserError(f"{path}: record {i} is not a JSON object; {redo}")
    missing = sorted(set(fields) - rec.keys())
    if missing:
      raise UserError(f"{path}: record {i} lacks {', '.join(missing)}; {redo}")
    records.append(rec)
  return records


def to_arrays(
    records: list[dict],
    max_prompt_len: int,
    max_response_len: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
  """The DQO training arrays in the batch layout of `dqo_jax.data.batches`; with `vocab_size`,
  UserError for a token id outside the model's vocabulary (it would make every loss NaN)."""
  for i, r in enumerate(records):
    ids = r["prompt"] + r["response"]
    if vocab_size is not None and ids and not 0 <= min(ids) <= max(ids) < vocab_size:
      bad = next(t for t in ids if not 0 <= t < vocab_size)
      raise UserError(
          f"offline record {i}: token id {bad} is outside the model's vocabulary of {vocab_size}; "
          "the samples come from another tokenizer or model: --redo=sample"
      )
    if len(r["prompt"]) > max_prompt_len or len(r["response"]) > max_response_len:
      raise UserError(
          "an offline sample is longer than data.max_prompt_len/max_response_len; "
          "sample again with the same limits the training stage uses (--redo=sample)"
      )
    if isinstance(r["reward"], bool) or not isinstance(r["reward"], (int, float)):
      raise UserError(f"offline record {i}: reward={r['reward']!r} is not a number; --redo=sample")
  prompt, prompt_mask = left_pad([r["prompt"] for r in records], max_prompt_len, pad_id)
  response, response_len = right_pad([r["response"] for r in records], max_response_len, pad_id)
  floats = lambda key: right_pad_floats([r[key] for r in records], max_response_len)
  return dict(
      prompt=prompt,
      prompt_mask=prompt_mask,
      response=response,
      response_len=response_len,
      behaviour_logprobs=floats("behaviour_logprobs"),
      ref_logprobs=floats("ref_logprobs"),
      reward=np.array([r["reward"] for r in records], np.float32),
  )


def right_pad_floats(seqs: list[list[float]], length: int) -> np.ndarray:
  out = np.zeros((len(seqs), length), np.float32)
  for i, s in enumerate(seqs):
    out[i, : len(s)] = s
  return out


def offline_arrays(
    records: list[dict], data_cfg, pad_id: int, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
  """The sample stage's records as the arrays every method's view draws its batches from."""
  arrays = to_arrays(
      records, data_cfg.max_prompt_len, data_cfg.max_response_len, pad_id, vocab_size
  )
  arrays["correct"] = np.array([is_success(r) for r in records], np.float32)
  return arrays
