"""Prompt formats: how a question is shown to the model, set by `config.data.prompt`.

    prompt = dict(
        style="zero_shot",      # or "few_shot": worked examples before the question
        num_shots=4,            # few_shot: how many worked examples
        exemplars="builtin",    # few_shot: "builtin" (the task's own, `dqo_jax.tasks`) or
                                # "train" (the first examples of the task's train split)
        instruction="...",      # text before everything else; "" for none
        template="Question: {question}\\nAnswer:\\n",  # one question; its solution follows
        chat_template="",       # "": plain text; "model": the tokenizer's chat template
    )

Plain text is `instruction`, a blank line, then per exemplar `template` + solution + a blank
line, then `template` for the question. The model's response (the SFT target, the sampled and the
graded text) starts right after it and must end in the task's answer format
(`dqo_jax.tasks.<task>.TASK.answer_format`); the built-in exemplars, instruction and template of
each task are in its module there.

With `chat_template` set, the same content is a conversation: one user turn per exemplar (the
instruction leads the first user turn), the exemplar's solution as the assistant turn, then the
question as the last user turn, rendered by `tokenizer.apply_chat_template(messages) -> str`,
which must return the text up to where the assistant's reply begins. Tokenizers without that
method (the SentencePiece tokenizer trained here) cannot use chat prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dqo_jax import tasks
from dqo_jax.errors import UserError

__all__ = ["make_renderer", "prompt_config", "render"]

_DEFAULTS = dict(
    style="zero_shot",
    num_shots=0,
    exemplars="builtin",
    instruction="",
    template="{question}\n",
    chat_template="",
)


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
  else:
    pool = tasks.get(task).exemplars(n + 1)
    where = f"the {len(pool)} built-in ones"
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
