"""Bounded text helpers shared by the GSM8K and MATH checkers.

Responses come from a policy under training and can be arbitrary, so every
helper here runs in time linear in a capped prefix of its input.
"""

from __future__ import annotations

__all__ = ["MAX_RESPONSE_CHARS", "has_box", "last_boxed"]

# Real responses are bounded by the generation budget (a few thousand tokens);
# anything longer is degenerate, so only its tail is examined (the final answer
# comes last).
MAX_RESPONSE_CHARS = 1 << 16
# Longer than any legitimate boxed answer; bounds the brace scan.
_MAX_BOXED_CHARS = 4096
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def has_box(text: str) -> bool:
  """Whether the examined tail of `text` holds a `\\boxed` / `\\fbox` command at all."""
  tail = text[-MAX_RESPONSE_CHARS:]
  return any(command in tail for command in _BOX_COMMANDS)


def last_boxed(text: str) -> str | None:
  """Contents of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), else None.

  Nested braces are matched with a depth counter over at most a few thousand
  characters, so 10k levels of nesting cost no recursion and a bounded scan.
  """
  tail = text[-MAX_RESPONSE_CHARS:]
  start = max(tail.rfind(command) for command in _BOX_COMMANDS)
  if start < 0:
    return None
  command = next(c for c in _BOX_COMMANDS if tail.startswith(c, start))
  position = start + len(command)
  # TeX skips spaces before an argument: "\boxed {5}" and "\boxed 5".
  while tail.startswith(" ", position) and position - start < _MAX_BOXED_CHARS:
    position += 1
  if not tail.startswith("{", position):
    # "\boxed 5": the argument is the next token, up to a space or "$".
    token = tail[position : position + _MAX_BOXED_CHARS]
    end = len(token)
    for stop in (" ", "$", "\n", "}"):
      found = token.find(stop)
      if 0 <= found < end:
        end = found
    return token[:end] or None
  depth = 0
  window = tail[position : position + _MAX_BOXED_CHARS]
  for index, char in enumerate(window):
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return window[1:index]
  # Unbalanced, or longer than any real answer.
  return None
