"""A pool of symbolic-comparison worker processes with a hard per-answer timeout.

Workers are plain subprocesses (`python -m dqo_jax.rewards._symbolic_worker`)
speaking JSON lines over pipes: unlike multiprocessing, this never re-imports
the caller's __main__ nor forks a process that may hold jax threads. A worker
that overruns its deadline is killed and replaced; the pool lives for the
process (start-up imports sympy, about a second) and is killed at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

__all__ = ["DEFAULT_MEMORY_BYTES", "compare_many", "shutdown"]

# Sympy and Math-Verify need a few hundred MB of address space; a comparison
# that wants more than this is building a huge number, not checking an answer.
DEFAULT_MEMORY_BYTES = 2 << 30
# Start-up is not counted against answers, but a worker that cannot even start
# means a broken environment, which must surface as an error.
_STARTUP_TIMEOUT = 120.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Worker:
  """One worker process and the state of its current request."""

  def __init__(self, memory_bytes: int):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    self.process = subprocess.Popen(
        [sys.executable, "-m", "dqo_jax.rewards._symbolic_worker", str(memory_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    self.started = time.monotonic()
    self.ready = False
    self.buffer = b""
    self.job: int | None = None
    self.deadline: float | None = None

  def send(self, index: int, gold: str, predicted: str, timeout: float) -> None:
    self.job = index
    self.deadline = time.monotonic() + timeout if self.ready else None
    self.process.stdin.write((json.dumps({"gold": gold, "predicted": predicted}) + "\n").encode())
    self.process.stdin.flush()

  def read_lines(self) -> list[bytes] | None:
    """Complete lines now available, or None once the worker has exited."""
    chunk = os.read(self.process.stdout.fileno(), 1 << 16)
    if not chunk:
      return None
    self.buffer += chunk
    *lines, self.buffer = self.buffer.split(b"\n")
    return lines

  def kill(self) -> None:
    self.process.kill()
    self.process.wait()
    for pipe in (self.process.stdin, self.process.stdout):
      pipe.close()


_lock = threading.Lock()
_workers: list[_Worker] = []
_memory_bytes = DEFAULT_MEMORY_BYTES


def shutdown() -> None:
  """Kills all workers; the next comparison starts fresh ones."""
  with _lock:
    while _workers:
      _workers.pop().kill()


atexit.register(shutdown)


def compare_many(
    pairs: Sequence[tuple[str, str]],
    *,
    num_workers: int,
    timeout: float,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> list[tuple[bool, str]]:
  """(equal, reason) for each (gold, predicted) pair, each bounded by `timeout` seconds."""
  global _memory_bytes
  if not pairs:
    return []
  results: list[tuple[bool, str] | None] = [None] * len(pairs)
  with _lock:
    if memory_bytes != _memory_bytes:
      while _workers:
        _workers.pop().kill()
      _memory_bytes = memory_bytes
    while len(_workers) < min(num_workers, len(pairs)):
      _workers.append(_Worker(memory_bytes))
    pending = deque(range(len(pairs)))
    try:
      _run(pairs, results, pending, timeout, memory_bytes)
    except BaseException:
      # Workers may hold half-done requests: none of them can be reused.
      while _workers:
        _workers.pop().kill()
      raise
  return results


def _run(pairs, results, pending, timeout, memory_bytes) -> None:
  """The event loop of `compare_many`: fills `results`; the caller holds `_lock`."""
  with selectors.DefaultSelector() as selector:
    for worker in _workers:
      selector.register(worker.process.stdout, selectors.EVENT_READ, worker)

    def replace(worker: _Worker, reason: str) -> None:
      results[worker.job] = (False, reason)
      selector.unregister(worker.process.stdout)
      worker.kill()
      fresh = _Worker(memory_bytes)
      _workers[_workers.index(worker)] = fresh
      selector.register(fresh.process.stdout, selectors.EVENT_READ, fresh)

    while True:
      for worker in _workers:
        if worker.job is None and pending:
          index = pending.popleft()
          worker.send(index, *pairs[index], timeout)
      busy = [w for w in _workers if w.job is not None]
      if not busy:
        break
      now = time.monotonic()
      deadlines = [w.deadline or w.started + _STARTUP_TIMEOUT for w in busy]
      for key, _ in selector.select(max(0.0, min(deadlines) - now)):
        worker = key.data
        lines = worker.read_lines()
        if lines is None:
          if worker.job is None:
            raise RuntimeError("a symbolic worker exited while idle")
          # Killed by the kernel (the memory limit) or crashed.
          replace(worker, "symbolic comparison crashed")
          continue
        for line in lines:
          if line == b"ready":
            worker.ready = True
            if worker.job is not None:
              worker.deadline = time.monotonic() + timeout
          else:
            reply = json.loads(line)
            results[worker.job] = (reply["equal"], reply["reason"])
            worker.job = worker.deadline = None
      now = time.monotonic()
      for worker in [w for w in _workers if w.job is not None]:
        if worker.deadline is not None and now >= worker.deadline:
          replace(worker, f"symbolic comparison timed out after {timeout:g}s")
        elif not worker.ready and now >= worker.started + _STARTUP_TIMEOUT:
          raise RuntimeError(f"a symbolic worker did not start in {_STARTUP_TIMEOUT:g}s")
