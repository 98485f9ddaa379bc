"""Progress bars, one policy for every loop that shows one.

On a terminal, tqdm's bar as usual. Where stderr is not a terminal (a log file under `nohup`, a
pipe, a CI log), a redrawn bar would leave one carriage-return update per step in the file, so a
bar there is a plain line, `desc: 45% 9/20 [00:07<00:05, 1.21it/s, loss=5.46]`, at most every
`LOG_INTERVAL_S` seconds; a loop shorter than that prints nothing (its stage prints a summary).
"""

from __future__ import annotations

import re
import sys

import tqdm as tqdm_lib

LOG_INTERVAL_S = 30.0
LOG_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)

# Cursor movements tqdm writes to place nested bars.
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
  """A stream for tqdm that writes each status it is given as a line of its own: tqdm redraws in
  place with carriage returns and cursor moves, which a file keeps as they are."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    for line in re.split(r"[\r\n]", _ESCAPES.sub("", text)):
      if line.strip():
        self._stream.write(line.rstrip() + "\n")

  def flush(self) -> None:
    self._stream.flush()


def _is_terminal(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())


class tqdm(tqdm_lib.tqdm):  # pylint: disable=invalid-name
  """tqdm.tqdm, called the same way, with the policy above."""

  def __init__(self, *args, **kwargs):
    stream = kwargs.get("file") or sys.stderr
    self._log = not _is_terminal(stream)
    if self._log:
      kwargs.update(
          file=_Lines(stream),
          bar_format=LOG_FORMAT,
          mininterval=LOG_INTERVAL_S,
          maxinterval=LOG_INTERVAL_S,
          delay=LOG_INTERVAL_S,
          leave=False,  # no closing line: the stage's summary line follows
      )
    super().__init__(*args, **kwargs)

  def refresh(self, nolock=False, lock_args=None):
    # `set_postfix` and the like redraw at once; in a log they wait for the interval too.
    if self._log and not self.disable:
      now = self._time()
      # (tqdm's __init__ draws the first line, with no delay, before it sets last_print_t)
      if now - getattr(self, "last_print_t", -LOG_INTERVAL_S) < LOG_INTERVAL_S:
        return False
      self.last_print_t = now
    return super().refresh(nolock=nolock, lock_args=lock_args)
