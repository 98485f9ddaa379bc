"""Prompt formats: how a question is shown to the model, set by `config.data.prompt`.

    prompt = dict(
        style="zero_shot",      # or "few_shot": worked examples before the question
        num_shots=4,            # few_shot: how many worked examples
        exemplars="builtin",    # few_shot: "builtin" (written for this project, `BUILTIN`) or
                                # "train" (the first examples of the task's train split)
        instruction="...",      # text before everything else; "" for none
        template="Question: {question}\\nAnswer:\\n",  # one question; its solution follows
        chat_template="",       # "": plain text; "model": the tokenizer's chat template
    )

Plain text is `instruction`, a blank line, then per exemplar `template` + solution + a blank
line, then `template` for the question. The model's response (the SFT target, the sampled and the
graded text) starts right after it and must end in the task's answer format (`ANSWER_FORMATS`).

With `chat_template` set, the same content is a conversation: one user turn per exemplar (the
instruction leads the first user turn), the exemplar's solution as the assistant turn, then the
question as the last user turn, rendered by `tokenizer.apply_chat_template(messages) -> str`,
which must return the text up to where the assistant's reply begins. Tokenizers without that
method (the SentencePiece tokenizer trained here) cannot use chat prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dqo_jax.errors import UserError

__all__ = ["ANSWER_FORMATS", "BUILTIN", "INSTRUCTIONS", "builtin_texts", "make_renderer", "render"]

# What the graders in dqo_jax.rewards read first, per task.
ANSWER_FORMATS = {"arith": "#### N", "gsm8k": "#### N", "math": "\\boxed{}"}

INSTRUCTIONS = {
    "gsm8k": (
        "Solve the math word problem step by step. Write the final answer as a number on its own "
        "last line, in the form '#### N'."
    ),
    "math": (
        "Solve the problem step by step. Put the final answer in \\boxed{}, simplified and in "
        "exact form."
    ),
}
INSTRUCTIONS["arith"] = INSTRUCTIONS["gsm8k"]

# Worked examples written for this project (none is taken from GSM8K or MATH), in each task's
# gold-solution style: GSM8K's "one calculation per line, then '#### N'" and MATH's LaTeX with a
# final \boxed{}. Arithmetic draws its exemplars from its own generator (`_arith_exemplars`).
_GSM8K_STYLE = (
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
_MATH_STYLE = (
    (
        "What is the smallest positive integer $n$ such that $3n$ is a multiple of 4 and of 9?",
        "$3n$ must be a multiple of $\\operatorname{lcm}(4, 9) = 36$, so $3n \\ge 36$ and "
        "$n \\ge 12$. Since $3 \\cdot 12 = 36$ works, the answer is $\\boxed{12}$.",
    ),
    (
        "Simplify $\\frac{6}{\\sqrt{3}}$.",
        "Multiplying top and bottom by $\\sqrt{3}$ gives $\\frac{6\\sqrt{3}}{3} = "
        "\\boxed{2\\sqrt{3}}$.",
    ),
    (
        "For which real numbers $x$ is $2x - 5 > 1$? Express your answer in interval notation.",
        "Adding 5 gives $2x > 6$, so $x > 3$. The solution set is $\\boxed{(3, \\infty)}$.",
    ),
    (
        "Two fair six-sided dice are rolled. What is the probability that the sum is 4? Express "
        "your answer as a common fraction.",
        "Of the $36$ equally likely outcomes, $(1,3)$, $(2,2)$ and $(3,1)$ sum to 4, so the "
        "probability is $\\frac{3}{36} = \\boxed{\\frac{1}{12}}$.",
    ),
    (
        "Find the distance between the points $(1, 2)$ and $(4, 6)$.",
        "The distance is $\\sqrt{(4-1)^2 + (6-2)^2} = \\sqrt{9 + 16} = \\boxed{5}$.",
    ),
    (
        "If $f(x) = x^2 - 3x$, what is $f(-2)$?",
        "$f(-2) = (-2)^2 - 3(-2) = 4 + 6 = \\boxed{10}$.",
    ),
)
BUILTIN = {"gsm8k": _GSM8K_STYLE, "math": _MATH_STYLE}

_DEFAULTS = dict(
    style="zero_shot",
    num_shots=0,
    exemplars="builtin",
    instruction="",
    template="{question}\n",
    chat_template="",
)


def _arith_exemplars(n: int) -> list[tuple[str, str]]:
  from dqo_jax.data import arith

  return [(p.question, p.solution) for p in arith.generate_split(seed=10**9, num_examples=n)]


# The question templates of configs/gsm8k.py and configs/math.py.
TEMPLATES = {"gsm8k": "Question: {question}\nAnswer:\n", "math": "Problem: {question}\nSolution:\n"}


def builtin_texts(task: str) -> list[str]:
  """Every fixed text a prompt for `task` may contain, for training a tokenizer on the data."""
  texts = [INSTRUCTIONS.get(task, ""), TEMPLATES.get(task, "").format(question="")]
  return [t for pair in BUILTIN.get(task, ()) for t in pair] + [t for t in texts if t]


def prompt_config(config) -> dict:
  """`config.data.prompt` over the defaults (a config without the section prompts as before)."""
  cfg = dict(_DEFAULTS)
  given = config.data.get("prompt")
  if given:
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    unknown = set(given) - set(_DEFAULTS)
    if unknown:
      raise UserError(
          f"config.data.prompt has unknown key(s) {sorted(unknown)}; use {list(_DEFAULTS)}"
      )
    cfg.update(given)
  if cfg["style"] not in ("zero_shot", "few_shot"):
    raise UserError(f"config.data.prompt.style={cfg['style']!r}; use 'zero_shot' or 'few_shot'")
  if cfg["exemplars"] not in ("builtin", "train"):
    raise UserError(f"config.data.prompt.exemplars={cfg['exemplars']!r}; use 'builtin' or 'train'")
  if "{question}" not in cfg["template"]:
    raise UserError("config.data.prompt.template must contain '{question}'")
  return cfg


def exemplar_pool(
    task: str, cfg: dict, train_examples: Sequence[dict] = ()
) -> list[tuple[str, str]]:
  """(question, solution) pairs to draw few-shot exemplars from: one more than `num_shots` where
  possible, so that a question is never its own exemplar."""
  if cfg["style"] != "few_shot":
    return []
  n = int(cfg["num_shots"])
  if n < 1:
    raise UserError(f"config.data.prompt.num_shots={n}: few_shot needs at least 1")
  if cfg["exemplars"] == "train":
    pool = [(ex["question"], ex["solution"]) for ex in train_examples[: n + 1]]
    where = "the train split"
  elif task == "arith":
    pool, where = _arith_exemplars(n + 1), "the arithmetic generator"
  else:
    pool, where = list(BUILTIN.get(task, ())), f"the {len(BUILTIN.get(task, ()))} built-in ones"
  if len(pool) < n:
    raise UserError(
        f"config.data.prompt.num_shots={n} but {where} hold(s) only {len(pool)} exemplars; "
        "lower --config.data.prompt.num_shots"
    )
  return pool


def render(question: str, cfg: dict, pool: Sequence[tuple[str, str]] = (), tokenizer=None) -> str:
  """The prompt for `question` under the prompt config `cfg` (see the module docstring)."""
  shots = [(q, s) for q, s in pool if q != question][: int(cfg["num_shots"])] if pool else []
  instruction = cfg["instruction"]
  if cfg["chat_template"]:
    messages = []
    for i, (q, s) in enumerate(shots + [(question, None)]):
      content = f"{instruction}\n\n{q}" if i == 0 and instruction else q
      messages.append({"role": "user", "content": content})
      if s is not None:
        messages.append({"role": "assistant", "content": s})
    return tokenizer.apply_chat_template(messages)
  parts = [f"{instruction}\n\n"] if instruction else []
  parts += [cfg["template"].format(question=q) + s + "\n\n" for q, s in shots]
  parts.append(cfg["template"].format(question=question))
  return "".join(parts)


def make_renderer(
    config, tokenizer=None, train_examples: Sequence[dict] = ()
) -> Callable[[str], str]:
  """question -> prompt text, for `config.data.task` and `config.data.prompt`."""
  cfg = prompt_config(config)
  if cfg["chat_template"] and not callable(getattr(tokenizer, "apply_chat_template", None)):
    raise UserError(
        f"config.data.prompt.chat_template={cfg['chat_template']!r} but the tokenizer "
        f"({type(tokenizer).__name__}) has no chat template; pass "
        "--config.data.prompt.chat_template='' for plain-text prompts"
    )
  pool = exemplar_pool(config.data.task, cfg, train_examples)
  return lambda question: render(question, cfg, pool, tokenizer)
