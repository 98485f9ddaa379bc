"""The embedded task: generated multi-step arithmetic word problems ("12+7=19" lines, then
"#### N"); `num_steps` is the number of operations. No downloads."""

from __future__ import annotations

from dqo_jax.rewards import arith as grader
from dqo_jax.tasks import Task, TaskSpec, data_dir

GSM8K_STYLE_INSTRUCTION = (
    "Solve the math word problem step by step. Write the final answer as a number on its own "
    "last line, in the form '#### N'."
)


def load(config, workdir: str) -> Task:
  from dqo_jax.data import arith_tfds  # pylint: disable=g-import-not-at-top

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
  where = data_dir(config, workdir)
  splits = arith_tfds.load_arith(where, **params)
  texts = lambda: [t for ex in splits["train"] for t in (ex["question"], ex["solution"])]
  return Task("arith", splits, texts, arith_tfds.arith_builder(where, **params).data_dir)


def exemplars(n: int) -> list[tuple[str, str]]:
  """Drawn from the generator with a seed no split uses."""
  from dqo_jax.data import arith  # pylint: disable=g-import-not-at-top

  return [(p.question, p.solution) for p in arith.generate_split(seed=10**9, num_examples=n)]


TASK = TaskSpec(
    name="arith",
    load=load,
    grader=grader,
    answer_format="#### N",
    instruction=GSM8K_STYLE_INSTRUCTION,
    template="{question}\n",
    exemplars=exemplars,
    # The name it had before the task registry, so that cached tokenizers stay valid (its
    # corpus is the generated train split, fixed by the config's generator fields).
    tokenizer_name="tokenizer_{vocab}.model",
)
