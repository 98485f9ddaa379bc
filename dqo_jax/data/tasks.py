"""A task's data for a run: `config.data.task` (a module of `dqo_jax/tasks/`) -> train,
validation and test examples and the tokenizer trained on them.

Every task's examples are plain dicts with what the pipeline reads:

- `question`: the problem text, rendered into a prompt by `dqo_jax.data.prompts`;
- `solution`: the SFT target, and the reference the grader (`dqo_jax.rewards`) compares with;
- `num_steps`: the int that evaluation groups accuracy by (results.json's `by_steps`);

plus fields of the task's own (each module of `dqo_jax/tasks/` says what they are).

`config.data.num_train` / `num_test` cap GSM8K and MATH (-1 = all), keeping the first examples
in the prepared dataset's fixed order; for arith they are the generated sizes.
`config.data.num_validation` examples are then held out from the end of train as the
`validation` split: every choice (steps, hyperparameters, the shipped variant) and every number
logged while training is measured there, so that the test split is read once per reported number.
"""

from __future__ import annotations

import hashlib
import os

from dqo_jax import tasks, tokenizer
from dqo_jax.errors import UserError
from dqo_jax.tasks import Task
from dqo_jax.tokenizer import Tokenizer, load_or_train_tokenizer

__all__ = ["check_model_path", "load_task", "load_tokenizer"]


def load_task(config, workdir: str) -> Task:
  """The examples of `config.data.task`, prepared under `config.data.dir` (default
  `<workdir>/data`) on first use."""
  specs = tasks.registry()
  if config.data.task not in specs:
    raise UserError(f"config.data.task={config.data.task!r}; choose from {sorted(specs)}")
  task = specs[config.data.task].load(config, workdir)
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
  fixed_name = tasks.get(task.name).tokenizer_name
  if fixed_name:
    path = os.path.join(task.tokenizer_dir, fixed_name.format(vocab=vocab))
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
