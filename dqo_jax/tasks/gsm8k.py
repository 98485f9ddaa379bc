"""GSM8K (Cobbe et al. 2021, MIT licence): grade-school math word problems. The SFT target is
the gold answer without its <<...>> calculator annotations, ending in "#### N"; `num_steps` is
the number of reasoning lines before "####"."""

from __future__ import annotations

from dqo_jax.rewards import gsm8k as grader
from dqo_jax.tasks import TaskSpec, calculator_equations, prepared_loader

# Worked examples written for this project (none is taken from GSM8K), in its gold-solution
# style: one calculation per line, then "#### N".
EXEMPLARS = (
    (
        "A baker makes 24 muffins in the morning and 18 in the afternoon. He sells 30 of them. "
        "How many muffins are left?",
        "He makes 24 + 18 = 42 muffins.\nAfter selling, 42 - 30 = 12 muffins are left.\n#### 12",
    ),
    (
        "Tickets to a fair cost $7 for adults and $4 for children. A family buys 2 adult tickets "
        "and 3 child tickets. How much do they pay?",
        "The adult tickets cost 2 * 7 = $14.\nThe child tickets cost 3 * 4 = $12.\n"
        "In total they pay 14 + 12 = $26.\n#### 26",
    ),
    (
        "Rosa reads 15 pages a day. Her book has 120 pages and she has already read 45. How many "
        "more days does she need to finish it?",
        "She has 120 - 45 = 75 pages left.\nAt 15 pages a day that takes 75 / 15 = 5 days.\n#### 5",
    ),
    (
        "A garden has 6 rows of tomato plants with 8 plants in each row. Each plant gives 3 "
        "tomatoes. How many tomatoes does the garden give?",
        "There are 6 * 8 = 48 plants.\nThey give 48 * 3 = 144 tomatoes.\n#### 144",
    ),
    (
        "Omar had $50. He spent half of it on a jacket and then $6 on lunch. How much money does "
        "he have now?",
        "The jacket cost 50 / 2 = $25.\nAfter the jacket he had 50 - 25 = $25.\n"
        "After lunch he has 25 - 6 = $19.\n#### 19",
    ),
    (
        "A school bus carries 40 students. 3 buses are full and a fourth bus carries 25 students. "
        "How many students ride the buses?",
        "The full buses carry 3 * 40 = 120 students.\nAll buses carry 120 + 25 = 145 students.\n"
        "#### 145",
    ),
    (
        "A phone battery loses 8 percent of its charge every hour. It starts at 100 percent. "
        "What is the charge after 4 hours, in percent?",
        "In 4 hours it loses 4 * 8 = 32 percent.\nThe charge is 100 - 32 = 68 percent.\n#### 68",
    ),
    (
        "Lena runs 3 km on weekdays and 5 km on Saturday and Sunday. How many km does she run in "
        "two weeks?",
        "On weekdays she runs 5 * 3 = 15 km a week.\nOn the weekend she runs 2 * 5 = 10 km.\n"
        "In one week she runs 15 + 10 = 25 km.\nIn two weeks she runs 2 * 25 = 50 km.\n#### 50",
    ),
)


def _example(raw: dict) -> dict:
  from dqo_jax.data import gsm8k_tfds  # pylint: disable=g-import-not-at-top

  return dict(
      question=raw["question"],
      solution=gsm8k_tfds.strip_calculator_annotations(raw["answer"]),
      num_steps=gsm8k_tfds.num_reasoning_lines(raw["answer"]),
      answer=raw["final_answer"],
      gold_answer=raw["answer"],
  )


TASK = TaskSpec(
    name="gsm8k",
    load=prepared_loader(
        "gsm8k", "gsm8k_tfds", "load_gsm8k", "gsm8k_builder", _example, lambda: EXEMPLARS
    ),
    grader=grader,
    answer_format="#### N",
    instruction=(
        "Solve the math word problem step by step. Write the final answer as a number on its own "
        "last line, in the form '#### N'."
    ),
    template="Question: {question}\nAnswer:\n",
    exemplars=lambda n: list(EXEMPLARS[:n]),
    # The gold solutions keep their <<expr=value>> annotations in `gold_answer`; samples have
    # lines of equations.
    equations=calculator_equations,
)
