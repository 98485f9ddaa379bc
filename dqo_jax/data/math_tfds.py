"""MATH (Hendrycks et al., 2021) through TFDS, prepared only from a local copy.

MATH is never downloaded or shipped by this project (see docs/data.md for where to get it).
`local_dir` holds each split in one of two layouts, chosen per split:

- `DIR/<split>.jsonl`: MATH-500 style (openai/prm800k's math_splits), one object per line with
  `problem`, `solution`, `answer`, `subject`, `level` (1-5) and `unique_id`
  (e.g. "test/algebra/1234.json");
- `DIR/<split>/<subject>/<id>.json`: the original Hendrycks release, one object per file with
  `problem`, `level` ("Level 3"), `type` ("Algebra") and `solution`.

The jsonl file wins when a split has both, so MATH-500 can be evaluated next to the Hendrycks
train split. Features: `problem`, `solution`, `answer` (the record's own, else the last \\boxed{}
of the solution), `level` (1-5; 0 for "Level ?"), `subject` and `unique_id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dqo_jax.data.tfds_util import FILE_FORMAT, files_digest, prepare_and_read, text
from dqo_jax.errors import UserError
from dqo_jax.rewards.math_answer import extract_answer

__all__ = ["MathLocal", "load_math", "parse_level", "split_files"]

SPLITS = ("train", "test")
WHERE = (
    "MATH is not downloaded for you: get the original release from https://github.com/hendrycks/math"
    " or the 12,000/500 MATH-500 split as jsonl from https://github.com/openai/prm800k "
    "(prm800k/math_splits); see docs/data.md"
)


def parse_level(level) -> int:
  """3, "3" or "Level 3" -> 3; anything else ("Level ?") -> 0."""
  value = str(level).strip().removeprefix("Level").strip()
  return int(value) if value.isdigit() else 0


def split_files(local_dir: str, split: str) -> tuple[str, list[str]]:
  """("jsonl" | "hendrycks", paths relative to `local_dir`) of one split, or a UserError."""
  jsonl = f"{split}.jsonl"
  if os.path.isfile(os.path.join(local_dir, jsonl)):
    return "jsonl", [jsonl]
  root = os.path.join(local_dir, split)
  files = sorted(
      os.path.relpath(os.path.join(d, f), local_dir)
      for d, _, names in os.walk(root)
      for f in names
      if f.endswith(".json")
  )
  if not files:
    raise UserError(
        f"config.data.local_dir={local_dir} has neither {split}.jsonl nor {split}/<subject>/<id>.json"
        f"; pass --config.data.local_dir=DIR holding MATH. {WHERE}"
    )
  return "hendrycks", files


def check_local_dir(local_dir: str) -> str:
  if not local_dir:
    raise UserError(f"MATH needs --config.data.local_dir=DIR. {WHERE}")
  path = os.path.abspath(os.path.expanduser(local_dir))
  if not os.path.isdir(path):
    raise UserError(
        f"config.data.local_dir={local_dir}: no such directory; pass --config.data.local_dir=DIR "
        f"holding MATH. {WHERE}"
    )
  for split in SPLITS:
    split_files(path, split)
  return path


class MathLocalConfig(tfds.core.BuilderConfig):
  """Named by a hash of the source files, so a different local copy gets its own directory."""

  def __init__(self, local_dir: str):
    files = [f for s in SPLITS for f in split_files(local_dir, s)[1]]
    super().__init__(
        name=f"d{files_digest(local_dir, files)}", description=f"prepared from {local_dir}"
    )
    self.local_dir = local_dir


def _record(row: dict, where: str, unique_id: str, subject: str = "") -> dict | None:
  """One example from a Hendrycks or MATH-500 record; None when it holds no answer at all."""
  try:
    problem, solution = row["problem"], row["solution"]
    level = parse_level(row.get("level", ""))
  except (KeyError, TypeError) as e:
    raise UserError(f"{where}: not a MATH record (missing {e})") from None
  boxed = extract_answer(solution)
  answer = str(row.get("answer") or boxed or "").strip()
  if not answer:
    return None
  if boxed is None:
    # The solution is both the SFT target and the grading reference: it must end boxed.
    solution = f"{solution.rstrip()}\nThe final answer is $\\boxed{{{answer}}}$."
  return dict(
      problem=problem,
      solution=solution,
      answer=answer,
      level=level,
      subject=str(row.get("subject") or row.get("type") or subject),
      unique_id=str(row.get("unique_id") or unique_id),
  )


class MathLocal(tfds.core.GeneratorBasedBuilder):
  """MATH's train and test splits prepared from a local copy (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # See arith_tfds.ArithmeticProblems: code_path only locates download checksums.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "problem": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "level": tfds.features.Scalar(dtype=np.int32),
                "subject": tfds.features.Text(),
                "unique_id": tfds.features.Text(),
            }
        ),
        homepage="https://github.com/hendrycks/math",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    root = self.builder_config.local_dir
    layout, files = split_files(root, split)
    skipped, seen = 0, set()
    for rel in files:
      path = os.path.join(root, rel)
      with open(path, encoding="utf-8") as f:
        if layout == "jsonl":
          rows = [(f"{rel}:{i + 1}", line) for i, line in enumerate(f) if line.strip()]
        else:
          rows = [(rel, f.read())]
      for where, raw in rows:
        try:
          row = json.loads(raw)
        except ValueError as e:
          raise UserError(f"{os.path.join(root, where)}: not JSON ({e})") from None
        if not isinstance(row, dict):
          raise UserError(f"{os.path.join(root, where)}: not a MATH record")
        subject_dir = os.path.basename(os.path.dirname(rel))
        ex = _record(row, os.path.join(root, where), where, subject_dir)
        if ex is None:
          skipped += 1
          continue
        key = ex["unique_id"] if ex["unique_id"] not in seen else where
        seen.add(key)
        yield key, ex
    if skipped:
      print(
          f"[data] MATH {split}: skipped {skipped} records with neither an answer nor a \\boxed{{}}"
      )


def math_builder(data_dir: str | os.PathLike, local_dir: str) -> MathLocal:
  config = MathLocalConfig(check_local_dir(local_dir))
  return MathLocal(config=config, data_dir=data_dir, file_format=FILE_FORMAT)


def _decode(example: dict) -> dict:
  return dict(
      problem=text(example["problem"]),
      solution=text(example["solution"]),
      answer=text(example["answer"]),
      level=int(example["level"]),
      subject=text(example["subject"]),
      unique_id=text(example["unique_id"]),
  )


def load_math(data_dir: str | os.PathLike, local_dir: str) -> dict[str, list[dict]]:
  """{"train": [...], "test": [...]} of {problem, solution, answer, level, subject, unique_id}.

  Prepared under `data_dir` on first use, read from there afterwards; in TFDS's fixed order.
  """
  return prepare_and_read(math_builder(data_dir, local_dir), _decode, SPLITS)
