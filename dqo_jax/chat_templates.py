"""Chat templates of the supported instruct models, rendered in Python (no Jinja at run time).

A model directory's Jinja template (`tokenizer_config.json`'s `chat_template`, or
`chat_template.jinja` / `chat_template.json`) is recognised by its markers and rendered by the
matching function below, which reproduces what `transformers.apply_chat_template` renders for
plain conversations ({"role": "system" | "user" | "assistant", "content": str}):

  * "chatml" (Qwen2, Qwen2.5): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, the
    template's default system message first when the conversation has none;
  * "gemma" (Gemma 1.1, Gemma 2): `<bos>` then `<start_of_turn>{user|model}\\n{content}`
    `<end_of_turn>\\n`; no system role, user and model turns alternate;
  * "llama3" (Llama 3): `<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n`
    `{content}<|eot_id|>`;
  * "llama3.1" (Llama 3.1, 3.2, 3.3): as llama3 with a system block that always carries
    "Cutting Knowledge Date: December 2023" and "Today Date: ..." (the template's fixed date,
    or today's date where the template calls `strftime_now`).

Tool calls are not supported; a template of another kind raises a ValueError naming the kinds.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re

STYLES = ("chatml", "gemma", "llama3", "llama3.1")
_END_OF_TURN = {
    "chatml": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "llama3": "<|eot_id|>",
    "llama3.1": "<|eot_id|>",
}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  style: str
  default_system: str = ""  # chatml: system message used when the conversation has none
  date_string: str | None = None  # llama3.1: fixed date; None means today's

  @property
  def end_of_turn(self) -> str:
    """The token that ends a turn: what an instruct model emits to stop."""
    return _END_OF_TURN[self.style]

  def render(self, messages, add_generation_prompt: bool = True, bos_token: str = "") -> str:
    messages = [_check(m) for m in messages]
    if not messages:
      raise ValueError("chat template: no messages")
    return getattr(self, "_" + self.style.replace(".", "_"))(
        messages, add_generation_prompt, bos_token
    )

  def _chatml(self, messages, gen, bos):
    del bos  # ChatML models have no BOS
    out = ""
    if messages[0]["role"] != "system" and self.default_system:
      out += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
    for m in messages:
      out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if gen else "")

  def _gemma(self, messages, gen, bos):
    if messages[0]["role"] == "system":
      raise ValueError("chat template: System role not supported")
    out = bos
    for i, m in enumerate(messages):
      if (m["role"] == "user") != (i % 2 == 0):
        raise ValueError("chat template: Conversation roles must alternate user/assistant/...")
      role = "model" if m["role"] == "assistant" else m["role"]
      out += f"<start_of_turn>{role}\n{m['content'].strip()}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if gen else "")

  def _llama3(self, messages, gen, bos):
    out = bos
    for m in messages:
      out += _header(m["role"]) + m["content"].strip() + "<|eot_id|>"
    return out + (_header("assistant") if gen else "")

  def _llama3_1(self, messages, gen, bos):
    system = ""
    if messages[0]["role"] == "system":
      system, messages = messages[0]["content"].strip(), messages[1:]
    date = self.date_string or datetime.date.today().strftime("%d %b %Y")
    out = bos + _header("system")
    out += f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>"
    for m in messages:
      out += _header(m["role"]) + m["content"].strip() + "<|eot_id|>"
    return out + (_header("assistant") if gen else "")


def _header(role: str) -> str:
  return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _check(m) -> dict:
  if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
    raise ValueError(
        f"chat template: messages need role system/user/assistant and string content, got {m!r}"
    )
  return m


def from_source(source: str) -> ChatTemplate:
  """The `ChatTemplate` a Jinja template source describes."""
  if "<think>" in source:  # Qwen 3's reasoning template
    raise ValueError(f"chat template not supported (supported kinds: {', '.join(STYLES)})")
  if "<|im_start|>" in source:
    # The default system message sits in a Jinja string literal ("\\n" as two characters) or in
    # raw template text (a real newline).
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^<'\"{]+)<\|im_end\|>", source)
    return ChatTemplate("chatml", default_system=m.group(1) if m else "")
  if "<start_of_turn>" in source:
    return ChatTemplate("gemma")
  if "<|start_header_id|>" in source:
    if "Cutting Knowledge Date" not in source:
      return ChatTemplate("llama3")
    if "strftime_now" in source:
      return ChatTemplate("llama3.1")
    m = re.search(r"set date_string = \"([^\"]+)\"", source)
    return ChatTemplate("llama3.1", date_string=m.group(1) if m else "26 Jul 2024")
  raise ValueError(f"chat template not supported (supported kinds: {', '.join(STYLES)})")


def read_template(directory: str, tokenizer_config: dict) -> ChatTemplate | None:
  """The chat template of a model directory, or None (a base model without one)."""
  source = tokenizer_config.get("chat_template")
  jinja = os.path.join(directory, "chat_template.jinja")
  if source is None and os.path.isfile(jinja):
    with open(jinja) as f:
      source = f.read()
  as_json = os.path.join(directory, "chat_template.json")
  if source is None and os.path.isfile(as_json):
    with open(as_json) as f:
      source = json.load(f).get("chat_template")
  if isinstance(source, list):  # named templates: the default one
    source = next((t["template"] for t in source if t.get("name") == "default"), None)
  return None if not source else from_source(source)
