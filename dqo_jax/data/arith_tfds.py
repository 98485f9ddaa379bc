"""The arithmetic task (`dqo_jax.data.arith`) packaged as a TFDS dataset.

The dataset is written as array_record and read back through
`builder.as_data_source`, so neither writing nor reading needs TensorFlow.
Each parameter set gets its own BuilderConfig, whose name encodes the
parameters, so differently-parameterised datasets never share a directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dqo_jax.data import arith
from dqo_jax.data.tfds_util import FILE_FORMAT as _FILE_FORMAT
from dqo_jax.data.tfds_util import prepare_and_read

__all__ = ["ArithParams", "ArithmeticConfig", "ArithmeticProblems", "load_arith"]


@dataclasses.dataclass(frozen=True)
class ArithParams:
  """Everything that determines the dataset's contents."""

  num_train: int
  num_test: int
  seed: int
  min_steps: int
  max_steps: int
  max_operand: int
  max_result: int


class ArithmeticConfig(tfds.core.BuilderConfig):
  """A BuilderConfig derived entirely from the generation parameters."""

  def __init__(self, params: ArithParams):
    # The readable prefix is for humans; the hash guarantees that any change
    # in any parameter (including ones left out of the prefix) changes the name.
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(params), sort_keys=True).encode()
    ).hexdigest()[:10]
    name = f"n{params.num_train}_{params.num_test}_s{params.seed}_{digest}"
    super().__init__(name=name, description=repr(params))
    self.params = params


class ArithmeticProblems(tfds.core.GeneratorBasedBuilder):
  """Multi-step arithmetic word problems with one-step-per-line solutions."""

  # Bump whenever `dqo_jax.data.arith` changes what a given seed produces, so
  # stale prepared data is not silently reused.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS derives code_path through `importlib_resources`, which 4.9.10 imports
  # on every Python but only declares as a dependency below 3.9
  # (tensorflow/datasets#11212). It is used solely to find download
  # checksums, and this builder downloads nothing.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "answer": tfds.features.Scalar(dtype=np.int32),
                "num_steps": tfds.features.Scalar(dtype=np.int32),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    p = self.builder_config.params
    gen = dict(
        min_steps=p.min_steps,
        max_steps=p.max_steps,
        max_operand=p.max_operand,
        max_result=p.max_result,
    )
    # 2*seed and 2*seed+1 are distinct for every int seed, so the splits
    # are drawn from different streams.
    train = arith.generate_split(2 * p.seed, p.num_train, **gen)
    test = arith.generate_split(2 * p.seed + 1, p.num_test, **gen)
    # Test questions that also occur in train would leak answers, so drop
    # them; test may therefore hold slightly fewer than num_test examples.
    seen = {problem.question for problem in train}
    test = [problem for problem in test if problem.question not in seen]
    return {
        "train": self._generate_examples(train),
        "test": self._generate_examples(test),
    }

  def _generate_examples(self, problems: list[arith.Problem]) -> Iterator[tuple[int, dict]]:
    for index, problem in enumerate(problems):
      yield index, dataclasses.asdict(problem)


def _decode(example: dict) -> dict:
  return {
      "question": example["question"].decode("utf-8"),
      "solution": example["solution"].decode("utf-8"),
      "answer": int(example["answer"]),
      "num_steps": int(example["num_steps"]),
  }


def arith_builder(data_dir: str | os.PathLike, **params) -> ArithmeticProblems:
  """The builder for one parameter set (see `ArithParams`); its `data_dir` holds the files."""
  return ArithmeticProblems(
      config=ArithmeticConfig(ArithParams(**params)), data_dir=data_dir, file_format=_FILE_FORMAT
  )


def load_arith(
    data_dir: str | os.PathLike,
    *,
    num_train: int,
    num_test: int,
    seed: int,
    min_steps: int,
    max_steps: int,
    max_operand: int,
    max_result: int,
) -> dict[str, list[dict]]:
  """Returns {"train": [...], "test": [...]} of plain-Python example dicts.

  Each example is {question: str, solution: str, answer: int, num_steps: int}.
  The dataset is prepared under `data_dir` on first use; later calls with the
  same parameters read the prepared files. Train is
  `arith.generate_split(2 * seed, num_train, ...)`; test is drawn with seed
  `2 * seed + 1`, minus any question that also occurs in train.
  """
  builder = arith_builder(
      data_dir,
      num_train=num_train,
      num_test=num_test,
      seed=seed,
      min_steps=min_steps,
      max_steps=max_steps,
      max_operand=max_operand,
      max_result=max_result,
  )
  return prepare_and_read(builder, _decode, ("train", "test"))
