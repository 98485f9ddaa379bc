"""One run at a time per workdir: a lock taken before the run writes anything, released when it
ends (normally, on an error or on Ctrl-C).

A second run on a workdir in use stops at once with one line naming the holder (host, pid, start
time). The lock is `LOCK_NAME` in the workdir:

- a local directory: the file, held with `flock` for the run's lifetime. The kernel releases it
  when the holder dies, even by kill -9, so a lock left by a dead process is simply free; a run
  that finds one says whose it was and takes it.
- a gs:// URL: an object created only if absent (`ifGenerationMatch=0`) and rewritten by a
  background thread every `REFRESH_SECONDS` as a lease, each write conditional on the generation
  this run last wrote. A lease not refreshed for `LEASE_SECONDS`, or one of a process of this
  host that no longer runs, is stale: it is taken over by a write conditional on its generation,
  which only one of several runs can win.

With several processes (multi-host), only process 0 takes the lock; the others learn whether it
got it, so they stop with it instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np

from dqo_jax import distributed
from dqo_jax.errors import UserError
from dqo_jax.workdir import LOCK_NAME

LEASE_SECONDS = 120.0
REFRESH_SECONDS = 20.0


def _holder() -> dict:
  """Who holds a lock: this process, with its start time on this host (a pid is reused)."""
  return dict(
      host=socket.gethostname(),
      pid=os.getpid(),
      pid_start=_pid_start(os.getpid()),
      started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
      refreshed=time.time(),
  )


def _pid_start(pid: int) -> str:
  """The start time of process `pid` in clock ticks since boot ("" if unknown, e.g. not Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive_here(record: dict) -> bool:
  """Whether the holder named by `record`, a process of this host, still runs."""
  pid = record.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, under another user
  started = record.get("pid_start")
  return not started or _pid_start(pid) in ("", started)


def _stale(record: dict) -> bool:
  if record.get("host") == socket.gethostname():
    return not _alive_here(record)
  return time.time() - float(record.get("refreshed", 0)) > LEASE_SECONDS


def _describe(record: dict) -> str:
  return (
      f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
      f"started {record.get('started', '?')}"
  )


def _in_use(where: str, record: dict, hint: str) -> UserError:
  return UserError(
      f"--workdir={where} is in use by another run ({_describe(record)}; lock {where}/"
      f"{LOCK_NAME}): wait for it to finish{hint}, or use another --workdir"
  )


def _read_json(data: bytes) -> dict:
  try:
    record = json.loads(data)
  except ValueError:  # a holder between creating the file and writing it, or garbage
    return {}
  return record if isinstance(record, dict) else {}


class _LocalLock:
  """`flock` on the lock file; the record in it says who holds it."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, LOCK_NAME)
    self.fd = None

  def acquire(self, announce):
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        record = _read_json(os.pread(fd, 1 << 16, 0))
        os.close(fd)
        raise _in_use(self.directory, record, "") from None
      # A holder that was releasing removed the file after we opened it: lock the new one.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _read_json(os.pread(fd, 1 << 16, 0))
    if previous:
      announce(f"took over the lock of a run that no longer holds it ({_describe(previous)})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    self.fd = fd

  def release(self):
    if self.fd is None:
      return
    os.unlink(self.path)  # before unlocking: a run waiting for this file then retries
    os.close(self.fd)
    self.fd = None


class _BucketLock:
  """A lease object in the bucket, every write and the final delete conditional on the
  generation this run last wrote (GCS JSON API through gcsfs)."""

  def __init__(self, url: str):
    from dqo_jax.workdir import _filesystem

    self.url = url
    self.fs, root = _filesystem(url)
    self.bucket, _, prefix = root.partition("/")
    self.key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    self.generation = None
    self.record = None
    self._stop = threading.Event()
    self._thread = None

  def _write(self, record: dict, if_generation: str) -> str | None:
    """Writes `record` if the object's generation is `if_generation` ("0": absent); returns the
    new generation, or None if the condition failed."""
    try:
      meta = self.fs.call(
          "POST",
          f"{self.fs._location}/upload/storage/v1/b/{urllib.parse.quote(self.bucket)}/o",
          uploadType="media",
          name=self.key,
          ifGenerationMatch=if_generation,
          data=json.dumps(record).encode(),
          headers={"Content-Type": "application/json"},
          json_out=True,
      )
    except FileExistsError:  # gcsfs's name for 412 Precondition Failed
      return None
    return str(meta["generation"])

  def _read(self) -> tuple[dict, str] | None:
    """(record, generation) of the lock object, or None if there is none."""
    try:
      headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
    except FileNotFoundError:
      return None
    return _read_json(data), headers["x-goog-generation"]

  def acquire(self, announce):
    record = _holder()
    for _ in range(5):  # each failed write means another run changed the lock meanwhile
      generation = self._write(record, "0")
      if generation is None:
        current = self._read()
        if current is None:
          continue
        holder, held_generation = current
        if holder == record:  # our own write, whose answer was lost and the request retried
          generation = held_generation
        elif not _stale(holder):
          expiry = f" (its lock expires {LEASE_SECONDS:.0f} s after it stops)"
          raise _in_use(self.url, holder, expiry)
        else:
          generation = self._write(record, held_generation)
          if generation is None:
            continue
          announce(f"took over the stale lock of {_describe(holder)}")
      self.generation, self.record = generation, record
      self._thread = threading.Thread(target=self._refresh, daemon=True, name="workdir lease")
      self._thread.start()
      return
    raise UserError(f"--workdir={self.url}: could not take its lock {LOCK_NAME}; try again")

  def _refresh(self):
    while not self._stop.wait(REFRESH_SECONDS):
      self.record = dict(self.record, refreshed=time.time())
      try:
        generation = self._write(self.record, self.generation)
      except Exception as e:  # a transient error: the lease outlives a few missed refreshes
        print(f"[setup] warning: could not refresh the lock of {self.url}: {e}", file=sys.stderr)
        continue
      if generation is None:
        print(
            f"[setup] warning: another run took over the lock of {self.url}; this run's "
            "results there may mix with its",
            file=sys.stderr,
        )
        return
      self.generation = generation

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.generation is not None:
      with contextlib.suppress(FileNotFoundError, FileExistsError):
        self.fs.call(
            "DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=self.generation
        )
      self.generation = None


@contextlib.contextmanager
def held(wd, announce=lambda line: print(f"[setup] {line}")):
  """Holds the lock of the Workdir `wd` (its URL if it has one) while the block runs."""
  lock = None
  if distributed.is_writer():
    lock = _BucketLock(wd.url) if wd.url else _LocalLock(wd.path)
  failure = None
  if lock is not None:
    try:
      lock.acquire(announce)
    except UserError as e:
      failure = e
  ok = _agree(failure is None)
  if failure is not None:
    raise failure
  if not ok:
    raise UserError("process 0 could not lock the workdir; its output says why")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process."""
  import jax

  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
