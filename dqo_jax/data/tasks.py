"""The task registry: `config.data.task` -> train/test examples and the tokenizer trained on them.

Every task's examples are plain dicts with what the pipeline reads:

- `question`: the problem text, rendered into a prompt by `dqo_jax.data.prompts`;
- `solution`: the SFT target, and the reference the grader (`dqo_jax.rewards`) compares with;
- `num_steps`: the int that evaluation groups accuracy by (results.json's `by_steps`);

plus task-specific fields:

| task  | solution                                   | num_steps                      | also       |
|-------|--------------------------------------------|--------------------------------|------------|
| arith | "12+7=19" lines, then "#### N"             | operations in the problem      | answer     |
| gsm8k | the gold answer without <<...>>, "#### N"  | reasoning lines before "####"  | answer, gold_answer |
| math  | the gold solution, ending in \\boxed{}     | the difficulty level, 1-5 (0 = "Level ?") | answer, level, subject, unique_id |

`config.data.num_train` / `num_test` cap GSM8K and MATH (-1 = all), keeping the first examples
in the prepared dataset's fixed order; for arith they are the generated sizes.
`config.data.num_validation` examples are then held out from the end of train as the
`validation` split: every choice (steps, hyperparameters, the shipped variant) and every number
logged while training is measured there, so that the test split is read once per reported number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

from dqo_jax.data import arith_tfds, gsm8k_tfds, math_tfds, prompts
from dqo_jax.errors import UserError
from dqo_jax import tokenizer
from dqo_jax.tokenizer import Tokenizer, load_or_train_tokenizer

__all__ = ["TASKS", "Task", "check_model_path", "load_task", "load_tokenizer"]


@dataclasses.dataclass
class Task:
  name: str
  splits: dict[str, list[dict]]  # "train", "test" and, when held out, "validation"
  tokenizer_texts: Callable[[], list[str]]  # the corpus a tokenizer for this data is trained on
  tokenizer_dir: str  # where that tokenizer is cached: beside the prepared data


def _data_dir(config, workdir: str) -> str:
  return config.data.dir or os.path.join(workdir, "data")


def _cap(examples: list[dict], n: int) -> list[dict]:
  return examples if n is None or n < 0 else examples[:n]


def _arith(config, workdir: str) -> Task:
  d = config.data
  params = dict(
      num_train=d.num_train,
      num_test=d.num_test,
      seed=d.seed,
      min_steps=d.min_steps,
      max_steps=d.max_steps,
      max_operand=d.max_operand,
      max_result=d.max_result,
  )
  data_dir = _data_dir(config, workdir)
  splits = arith_tfds.load_arith(data_dir, **params)
  texts = lambda: [t for ex in splits["train"] for t in (ex["question"], ex["solution"])]
  return Task("arith", splits, texts, arith_tfds.arith_builder(data_dir, **params).data_dir)


def _gsm8k_example(raw: dict) -> dict:
  return dict(
      question=raw["question"],
      solution=gsm8k_tfds.strip_calculator_annotations(raw["answer"]),
      num_steps=gsm8k_tfds.num_reasoning_lines(raw["answer"]),
      answer=raw["final_answer"],
      gold_answer=raw["answer"],
  )


def _math_example(raw: dict) -> dict:
  return dict(
      question=raw["problem"],
      solution=raw["solution"],
      num_steps=raw["level"],
      answer=raw["answer"],
      level=raw["level"],
      subject=raw["subject"],
      unique_id=raw["unique_id"],
  )


def _texts(train: list[dict], task: str) -> list[str]:
  """Train questions and solutions plus the fixed prompt texts (instruction, exemplars), so that
  a tokenizer trained on them covers every prompt whatever `config.data.prompt` says."""
  return [t for ex in train for t in (ex["question"], ex["solution"])] + prompts.builtin_texts(task)


def _real_task(name: str, load, builder, example):
  """A task prepared from downloaded or local files: `load(data_dir, local_dir)` gives the raw
  splits, `example(raw)` one pipeline example; data.num_train/num_test cap the splits."""

  def task(config, workdir: str) -> Task:
    d = config.data
    local_dir, data_dir = d.get("local_dir", ""), _data_dir(config, workdir)
    raw = load(data_dir, local_dir)
    caps = dict(train=d.get("num_train", -1), test=d.get("num_test", -1))
    splits = {s: [example(r) for r in _cap(raw[s], caps[s])] for s in ("train", "test")}
    texts = lambda: _texts(splits["train"], name)
    return Task(name, splits, texts, builder(data_dir, local_dir).data_dir)

  return task


_gsm8k = _real_task("gsm8k", gsm8k_tfds.load_gsm8k, gsm8k_tfds.gsm8k_builder, _gsm8k_example)
_math = _real_task("math", math_tfds.load_math, math_tfds.math_builder, _math_example)

TASKS: dict[str, Callable[[object, str], Task]] = {"arith": _arith, "gsm8k": _gsm8k, "math": _math}


def load_task(config, workdir: str) -> Task:
  """The examples of `config.data.task`, prepared under `config.data.dir` (default
  `<workdir>/data`) on first use."""
  try:
    loader = TASKS[config.data.task]
  except KeyError:
    raise UserError(f"config.data.task={config.data.task!r}; choose from {sorted(TASKS)}") from None
  task = loader(config, workdir)
  _hold_out_validation(task, config.data.get("num_validation", 0))
  for split, examples in task.splits.items():
    if not examples:
      raise UserError(f"{task.name}: the {split} split is empty; check config.data")
  return task


def _hold_out_validation(task: Task, n: int) -> None:
  """Moves the last `n` train examples to `task.splits["validation"]`, in place (the tokenizer
  corpus, read lazily from the train split, then excludes them too)."""
  if n <= 0:
    return
  train = task.splits["train"]
  if n >= len(train):
    raise UserError(
        f"config.data.num_validation={n} leaves no training examples of {len(train)}; "
        "lower it or raise config.data.num_train"
    )
  task.splits["train"], task.splits["validation"] = train[:-n], train[-n:]


def load_tokenizer(config, task: Task) -> Tokenizer:
  """The pretrained model's own tokenizer, or else a SentencePiece tokenizer trained on the
  task's train split and cached beside the data."""
  if config.model.get("path"):
    return tokenizer.load_tokenizer(os.path.expanduser(config.model.path))
  vocab = config.tokenizer.vocab_size
  if task.name == "arith":  # the name it had before the registry, so cached ones stay valid
    path = os.path.join(task.tokenizer_dir, f"tokenizer_{vocab}.model")
    return load_or_train_tokenizer(path, task.tokenizer_texts, vocab)
  # The corpus depends on num_train (and on the prompt texts), so its hash names the file.
  texts = task.tokenizer_texts()
  digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:10]
  path = os.path.join(task.tokenizer_dir, f"tokenizer_{vocab}_{digest}.model")
  return load_or_train_tokenizer(path, lambda: texts, vocab)


def check_model_path(config) -> None:
  """A preset that fine-tunes a pretrained model names it in `config.model.path`: fail early,
  in one line, when it is empty or absent."""
  path = config.model.get("path", "")
  name = config.model.get("name", "")
  if not path and not name:
    return  # a model trained from scratch, described by the config itself
  if not path:
    raise UserError(
        f"this config fine-tunes {name}: pass --config.model.path=DIR, a directory holding its "
        "weights and tokenizer"
    )
  if not os.path.isdir(os.path.expanduser(path)):
    raise UserError(
        f"config.model.path={path}: no such directory; pass --config.model.path=DIR, a directory "
        f"holding the weights and tokenizer of {name or 'the model'}"
    )
  from dqo_jax import convert

  try:  # an incomplete model directory: one line naming what is missing
    convert.check_pretrained(path)
  except (OSError, ValueError) as e:
    raise UserError(f"config.model.path: {e}")
