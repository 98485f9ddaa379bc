"""GSM8K (Cobbe et al., 2021) through TFDS, written as array_record and read without TensorFlow.

Two sources give the same splits (train 7,473 / test 1,319) and the same features:

- `local_dir=""`: TFDS's own `gsm8k` builder, which downloads the official files from
  github.com/openai/grade-school-math on first use (it also writes the Socratic splits, unused).
- `local_dir=DIR`: `Gsm8kLocal`, which prepares them from a directory holding the official
  `train.jsonl` and `test.jsonl` (one {"question", "answer"} object per line); no network.

Features are TFDS's (`question`, `answer` = the full gold solution with its <<...>> calculator
annotations and "#### N" line, `annotation` = the part before "#### ", `short_answer` = the part
after it), plus, in `Gsm8kLocal`, `final_answer`: the short answer without thousands commas.
`load_gsm8k` returns plain dicts either way, computing what the source lacks.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds

from dqo_jax.data.tfds_util import FILE_FORMAT, files_digest, prepare_and_read, text
from dqo_jax.errors import UserError

__all__ = [
    "Gsm8kLocal",
    "final_answer",
    "load_gsm8k",
    "num_reasoning_lines",
    "strip_calculator_annotations",
]

SPLITS = ("train", "test")
OFFICIAL_URL = "https://github.com/openai/grade-school-math/tree/master/grade_school_math/data"
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(answer: str) -> str:
  """'48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips': the SFT target a model should write."""
  return _ANNOTATION_RE.sub("", answer)


def _split_answer(answer: str) -> tuple[str, str]:
  """(reasoning, short answer) of a gold solution, split at its last '#### '."""
  reasoning, sep, short = answer.rpartition("####")
  if not sep:
    raise ValueError(f"GSM8K answer without a '####' line: {answer[-200:]!r}")
  return reasoning, short.strip()


def final_answer(answer: str) -> str:
  """The number after '#### ', thousands commas removed: '#### 1,080' -> '1080'."""
  return _split_answer(answer)[1].replace(",", "")


def num_reasoning_lines(answer: str) -> int:
  """Non-empty lines before the '####' line: the number of reasoning steps (2 to 11 in GSM8K)."""
  return sum(1 for line in _split_answer(answer)[0].splitlines() if line.strip())


def check_local_dir(local_dir: str) -> str:
  """The absolute directory, or a UserError that names the fix."""
  path = os.path.abspath(os.path.expanduser(local_dir))
  fix = (
      f"pass --config.data.local_dir=DIR with GSM8K's train.jsonl and test.jsonl from {OFFICIAL_URL}"
      ", or --config.data.local_dir='' to download them with TFDS"
  )
  if not os.path.isdir(path):
    raise UserError(f"config.data.local_dir={local_dir}: no such directory; {fix}")
  missing = [f"{s}.jsonl" for s in SPLITS if not os.path.isfile(os.path.join(path, f"{s}.jsonl"))]
  if missing:
    raise UserError(f"config.data.local_dir={local_dir} has no {' or '.join(missing)}; {fix}")
  return path


class Gsm8kLocalConfig(tfds.core.BuilderConfig):
  """Named by a hash of the source files, so a different local copy gets its own directory."""

  def __init__(self, local_dir: str):
    digest = files_digest(local_dir, [f"{s}.jsonl" for s in SPLITS])
    super().__init__(name=f"d{digest}", description=f"prepared from {local_dir}")
    self.local_dir = local_dir


class Gsm8kLocal(tfds.core.GeneratorBasedBuilder):
  """GSM8K's train and test splits prepared from a local copy of the official jsonl files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # See arith_tfds.ArithmeticProblems: code_path only locates download checksums.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    names = ("question", "answer", "annotation", "short_answer", "final_answer")
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in names}),
        homepage="https://github.com/openai/grade-school-math",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    root = self.builder_config.local_dir
    return {s: self._generate_examples(os.path.join(root, f"{s}.jsonl")) for s in SPLITS}

  def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
      for index, line in enumerate(f):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          question, answer = row["question"], row["answer"]
          annotation, short = _split_answer(answer)
        except (ValueError, KeyError, TypeError) as e:
          raise UserError(f"{path}:{index + 1}: not a GSM8K record ({e})") from None
        yield index, dict(
            question=question,
            answer=answer,
            annotation=annotation,  # as TFDS's: ends with the newline before "####"
            short_answer=short,
            final_answer=short.replace(",", ""),
        )


@functools.cache
def _download_builder_cls():
  """TFDS's own `gsm8k` builder, with the code_path workaround of `Gsm8kLocal`."""
  from tensorflow_datasets.text.gsm8k import gsm8k

  class Gsm8kDownload(gsm8k.Gsm8k, skip_registration=True):
    name = "gsm8k"
    code_path = None

  return Gsm8kDownload


def gsm8k_builder(data_dir: str | os.PathLike, local_dir: str = "") -> tfds.core.DatasetBuilder:
  """The builder whose `data_dir` holds the prepared files: `Gsm8kLocal` or TFDS's `gsm8k`."""
  if local_dir:
    config = Gsm8kLocalConfig(check_local_dir(local_dir))
    return Gsm8kLocal(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  return _download_builder_cls()(data_dir=data_dir, file_format=FILE_FORMAT)


def _decode(example: dict) -> dict:
  answer = text(example["answer"])
  return dict(
      question=text(example["question"]),
      answer=answer,
      final_answer=text(example["final_answer"])
      if "final_answer" in example
      else final_answer(answer),
  )


def load_gsm8k(data_dir: str | os.PathLike, local_dir: str = "") -> dict[str, list[dict]]:
  """{"train": [...], "test": [...]} of {question, answer, final_answer} dicts.

  Prepared under `data_dir` on first use (downloading when `local_dir` is ""), read from there
  afterwards. The order is TFDS's (a fixed shuffle of the file order), the same on every run.
  """
  return prepare_and_read(gsm8k_builder(data_dir, local_dir), _decode, SPLITS)
