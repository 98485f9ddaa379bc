"""dqo_jax.progress: tqdm's bar on a terminal; elsewhere whole lines, at most one per interval."""

import io

from dqo_jax import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_a_terminal_gets_tqdms_bar_redrawn_in_place():
  out = _Terminal()
  for _ in progress.tqdm(range(5), desc="sft", file=out, mininterval=0):
    pass
  assert "\r" in out.getvalue() and "sft: 100%|" in out.getvalue()


def test_a_file_gets_whole_lines(monkeypatch):
  monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line for every update
  out = io.StringIO()
  with progress.tqdm(total=4, desc="dqo", file=out) as bar:
    for step in range(4):
      bar.set_postfix(loss=1.0 / (step + 1), refresh=False)
      bar.update()
  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
  assert [line.split(" [")[0] for line in text.splitlines()] == [
      "dqo:   0% 0/4",
      "dqo:  25% 1/4",
      "dqo:  50% 2/4",
      "dqo:  75% 3/4",
      "dqo: 100% 4/4",
  ]
  assert text.splitlines()[-1].endswith("it/s, loss=0.25]")


def test_a_file_gets_nothing_from_a_loop_shorter_than_the_interval():
  out = io.StringIO()
  for _ in progress.tqdm(range(1000), desc="sample", file=out, leave=False):
    pass
  with progress.tqdm(total=1000, desc="sft", file=out) as bar:
    for step in range(1000):
      bar.update()
      bar.set_postfix(loss=1.0 / (step + 1))  # redraws at once on a terminal
      progress.tqdm.write("[sft] a message between updates", file=io.StringIO())
  assert out.getvalue() == ""
