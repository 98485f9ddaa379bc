"""The tasks, one module each, registered by name (`config.data.task`) when imported.

A task module defines `TASK = TaskSpec(...)`: how its examples are loaded, the module that
grades a response (in `dqo_jax.rewards`), the answer format the grader reads, its prompt texts
(instruction, question template, built-in few-shot exemplars) and the equations of a solution
that RFT deduplicates by. `dqo_jax.data.tasks`, `dqo_jax.data.prompts`, `dqo_jax.rewards` and
the configs read this registry; adding a task is adding a module here (plus its grader and
config). Nothing here imports jax: `dqo_jax.rewards` reads it too, and loaders are imported by
the task modules only when called.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from collections.abc import Callable, Sequence
from types import ModuleType

from dqo_jax import registry as registry_lib


@dataclasses.dataclass
class Task:
  """A task's loaded data. Examples are dicts with `question` (rendered into the prompt by
  `dqo_jax.data.prompts`), `solution` (the SFT target and the grader's reference) and
  `num_steps` (what evaluation groups accuracy by), plus fields of the task's own."""

  name: str
  splits: dict[str, list[dict]]  # "train", "test" and, when held out, "validation"
  tokenizer_texts: Callable[[], list[str]]  # the corpus a tokenizer for this data is trained on
  tokenizer_dir: str  # where that tokenizer is cached: beside the prepared data


_CALCULATOR = re.compile(r"<<([^<>]*)>>")


def equation_lines(text: str) -> tuple[str, ...]:
  """The sequence of equations of a solution, whitespace removed: every line holding "=" (lines
  without one, prose or the final answer, are ignored, as Yuan et al. (2023) do)."""
  return tuple("".join(l.split()) for l in text.splitlines() if "=" in l)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  load: Callable[[object, str], Task]  # (config, workdir) -> its splits, prepared on first use
  # `check(response, reference) -> (correct, predicted, reason)`, and optionally
  # `check_many(responses, references, *, num_workers, timeout)` with a `timeout` on `check`.
  grader: ModuleType
  answer_format: str  # what the grader reads first, e.g. "#### N"
  instruction: str  # the instruction of its configs' prompts
  template: str  # its configs' question template
  exemplars: Callable[[int], list[tuple[str, str]]]  # n built-in few-shot (question, solution)
  equations: Callable[[str], tuple[str, ...]] = equation_lines  # RFT's deduplication key
  tokenizer_name: str = ""  # a fixed tokenizer file name ("" = named by its corpus's hash)


@functools.cache
def registry() -> dict[str, TaskSpec]:
  return registry_lib.discover(__name__, __path__, "TASK")


def get(name: str) -> TaskSpec:
  specs = registry()
  if name not in specs:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(specs)}")
  return specs[name]


def data_dir(config, workdir: str) -> str:
  return config.data.dir or os.path.join(workdir, "data")


def fixed_texts(spec: TaskSpec, exemplars: Sequence[tuple[str, str]]) -> list[str]:
  """Every fixed text a prompt of the task may contain (instruction, template, exemplars), for
  training a tokenizer on the data."""
  texts = [spec.instruction, spec.template.format(question="")]
  return [t for pair in exemplars for t in pair] + [t for t in texts if t]


def calculator_equations(text: str) -> tuple[str, ...]:
  """GSM8K marks its computations as <<expr=value>>: those, whitespace removed, where there
  are any; else `equation_lines`."""
  marked = _CALCULATOR.findall(text)
  return tuple("".join(l.split()) for l in marked) if marked else equation_lines(text)


def cap(examples: list[dict], n: int | None) -> list[dict]:
  """The first `n` examples (all when n is None or negative)."""
  return examples if n is None or n < 0 else examples[:n]


def prepared_loader(name, module, load, builder, example, exemplars):
  """The loader of a task prepared from downloaded or local files by `dqo_jax.data.<module>`:
  `<load>(data_dir, local_dir)` gives the raw splits, `example(raw)` one pipeline example;
  `config.data.num_train` and `num_test` cap the splits. Its tokenizer corpus is the train
  split's questions and solutions plus the prompt's fixed texts (`exemplars()` among them), so
  that a tokenizer trained on it covers every prompt whatever `config.data.prompt` says."""

  def load_task(config, workdir: str) -> Task:
    data = importlib.import_module(f"dqo_jax.data.{module}")
    d = config.data
    local_dir, where = d.get("local_dir", ""), data_dir(config, workdir)
    raw = getattr(data, load)(where, local_dir)
    caps = dict(train=d.get("num_train", -1), test=d.get("num_test", -1))
    splits = {s: [example(r) for r in cap(raw[s], caps[s])] for s in ("train", "test")}
    texts = lambda: [t for ex in splits["train"] for t in (ex["question"], ex["solution"])] + (
        fixed_texts(get(name), exemplars())
    )
    return Task(name, splits, texts, getattr(data, builder)(where, local_dir).data_dir)

  return load_task
