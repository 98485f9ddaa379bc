"""Prompt formats: zero- and few-shot, each task's answer format, the chat-template hook."""

import importlib.util
import os
import re

import ml_collections
import pytest

from dqo_jax import tasks
from dqo_jax.data import prompts
from dqo_jax.tasks import gsm8k as gsm8k_task
from dqo_jax.tasks import math as math_task
from dqo_jax.data.batches import encode_examples
from dqo_jax.errors import UserError
from dqo_jax.rewards import grade
from dqo_jax.tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [
    dict(question=f"Train question {i}?", solution=f"{i}+1={i + 1}\n#### {i + 1}") for i in range(6)
]


def _config(task="gsm8k", **prompt):
  data = dict(task=task)
  if prompt is not None:
    data["prompt"] = prompt
  return ml_collections.ConfigDict(dict(data=data))


def _load_config(name, arg):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_without_a_prompt_section_the_prompt_is_the_question_and_a_newline():
  config = ml_collections.ConfigDict(dict(data=dict(task="arith")))
  assert prompts.make_renderer(config)("Mia has 3 coins.") == "Mia has 3 coins.\n"


def test_zero_shot():
  render = prompts.make_renderer(
      _config(instruction="Be brief.", template="Q: {question}\nA:\n", num_shots=3)
  )
  assert render("What is 2+2?") == "Be brief.\n\nQ: What is 2+2?\nA:\n"


@pytest.mark.parametrize("task, n", [("gsm8k", 8), ("math", 6), ("arith", 5)])
def test_few_shot_builtin(task, n):
  template = "Question: {question}\nAnswer:\n"
  render = prompts.make_renderer(
      _config(task, style="few_shot", num_shots=n, instruction="Solve.", template=template)
  )
  text = render("The real question?")
  assert text.startswith("Solve.\n\n") and text.endswith("Question: The real question?\nAnswer:\n")
  assert text.count("Question: ") == n + 1
  # Every exemplar ends in the task's answer format, so the model sees what the grader reads.
  marker = {"gsm8k": "\n#### ", "arith": "\n#### ", "math": "\\boxed{"}[task]
  assert text.count(marker) == n


def test_builtin_exemplars_are_right():
  for question, solution in gsm8k_task.EXEMPLARS:
    # Each "a op b = c" line computes c.
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", solution):
      assert eval(f"{a}{op}{b}") == int(c), (question, a, op, b, c)  # noqa: S307
    assert grade("gsm8k", solution, solution).correct
  for _, solution in math_task.EXEMPLARS:
    assert grade("math", solution, solution).correct


def test_a_question_is_never_its_own_exemplar():
  config = _config(style="few_shot", num_shots=2, exemplars="train", template="{question}\n")
  render = prompts.make_renderer(config, train_examples=TRAIN)
  assert render("New?") == (
      "Train question 0?\n0+1=1\n#### 1\n\nTrain question 1?\n1+1=2\n#### 2\n\nNew?\n"
  )
  assert render("Train question 0?").startswith(
      "Train question 1?\n1+1=2\n#### 2\n\nTrain question 2?"
  )


class _ChatTokenizer:

  def __init__(self):
    self.seen = []

  def apply_chat_template(self, messages):
    self.seen.append(messages)
    return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_template_hook():
  tok = _ChatTokenizer()
  config = _config(style="few_shot", num_shots=1, instruction="Solve.", chat_template="model")
  text = prompts.make_renderer(config, tok)("What is 1+1?")
  (messages,) = tok.seen
  assert [m["role"] for m in messages] == ["user", "assistant", "user"]
  assert messages[0]["content"] == "Solve.\n\n" + gsm8k_task.EXEMPLARS[0][0]
  assert messages[1]["content"] == gsm8k_task.EXEMPLARS[0][1]
  assert messages[2]["content"] == "What is 1+1?"
  assert text.endswith("<user>What is 1+1?</user><assistant>")
  zero = prompts.make_renderer(_config(instruction="Solve.", chat_template="model"), tok)("Q?")
  assert zero == "<user>Solve.\n\nQ?</user><assistant>"


def test_chat_template_needs_a_tokenizer_that_has_one():
  with pytest.raises(UserError, match=r"chat_template=''"):
    prompts.make_renderer(_config(chat_template="model"), object())


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (dict(style="five_shot"), "use 'zero_shot' or 'few_shot'"),
        (dict(style="few_shot", num_shots=9), "num_shots=9 but the 8 built-in ones"),
        (dict(style="few_shot", num_shots=0), "at least 1"),
        (dict(exemplars="test"), "use 'builtin' or 'train'"),
        (dict(template="no placeholder"), "must contain '{question}'"),
        (dict(shots=2), "unknown key(s) ['shots']"),
    ],
)
def test_bad_prompt_config(prompt, expected):
  with pytest.raises(UserError) as e:
    prompts.make_renderer(_config(**prompt))
  assert expected in str(e.value)


@pytest.mark.parametrize("name, task", [("gsm8k", "gsm8k"), ("math", "math")])
def test_configs_use_the_task_formats(name, task):
  for arg in ("tiny", "qwen2_7b", "gemma_7b", "llama3_8b", ""):
    c = _load_config(name, arg)
    assert c.data.task == task
    spec = tasks.get(task)
    assert c.data.prompt.instruction == spec.instruction
    assert c.data.prompt.template == spec.template
    assert spec.answer_format in c.data.prompt.instruction.replace("N'", "N")
    few = c.copy_and_resolve_references()
    few.data.prompt.style = "few_shot"
    assert prompts.make_renderer(few)("Q?").endswith(
        task == "gsm8k" and "Answer:\n" or "Solution:\n"
    )
    if arg not in ("tiny",):
      assert c.model.path == "" and c.model.name


def test_encode_examples_uses_the_rendered_prompt(tmp_path):
  render = prompts.make_renderer(_config(instruction="Solve.", template="Q: {question}\nA:\n"))
  tok = train_sentencepiece(
      [render(ex["question"]) + ex["solution"] for ex in TRAIN], tmp_path / "t.model", 128
  )
  enc = encode_examples(tok, TRAIN, 64, 32, render)
  row = enc.arrays["prompt"][0][enc.arrays["prompt_mask"][0] == 1]
  assert row[0] == tok.bos_id and tok.decode(row[1:]) == "Solve.\n\nQ: Train question 0?\nA:\n"
  assert len(encode_examples(tok, TRAIN, 8, 32, render)) == 0  # too long: dropped, not cut


def test_a_prompt_that_already_starts_with_bos_gets_no_second_one():
  from dqo_jax.data.batches import encode_prompt

  class Tok:
    bos_id, add_bos = 2, True

    def encode(self, text):
      return [2, 7] if text.startswith("<bos>") else [7]

  assert encode_prompt(Tok(), "<bos>q", lambda q: q) == [2, 7]
  assert encode_prompt(Tok(), "q", lambda q: q) == [2, 7]
  Tok.add_bos = False
  assert encode_prompt(Tok(), "q", lambda q: q) == [7]
