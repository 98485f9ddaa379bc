"""A run's workdir: a local directory, or a URL (gs://BUCKET/PATH) mirrored by a local cache.

Orbax writes checkpoints straight to the URL: every host writes its own shards there, and a
preempted VM loses none of them. Every other output (data, tokenizer, samples, JSON results,
TensorBoard events) is written with plain file I/O into the local cache, which process 0 copies
up to the URL after each stage and each checkpoint; every process copies the URL's files down at
the start and after each stage, so a rerun on a fresh VM, or on another host, sees what earlier
runs wrote. DONE.json files go up last, so a stage whose copy was cut short is run again.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from dqo_jax import distributed
from dqo_jax.errors import UserError

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Orbax's own directories: written and read at the URL, never copied.
_CHECKPOINTS = "checkpoints"
# The workdir lock (dqo_jax/workdir_lock.py): held at the URL itself, never copied.
LOCK_NAME = ".lock.json"


def is_url(path: str) -> bool:
  return bool(_URL.match(path))


def check_local(workdir: str) -> str:
  """An absolute local directory that this process can write to, created if missing."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: on a shared workdir the hosts must not remove each other's.
    probe = os.path.join(workdir, f".write_probe.{os.uname().nodename}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(
        f"--workdir={workdir} is not writable ({e.strerror}); pass a directory you can write to"
    )
  return workdir


def _filesystem(url: str):
  """(fsspec filesystem, path inside it) for a URL, with a one-line error naming the fix."""
  import fsspec

  try:
    fs, root = fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    scheme = url.split("://")[0]
    hint = "pip install gcsfs (in requirements.txt)" if scheme == "gs" else "use a gs:// URL"
    raise UserError(f"--workdir={url}: no filesystem for {scheme}:// ({e}); {hint}") from None
  return fs, root.rstrip("/")


def _is_checkpoint_file(relpath: str) -> bool:
  return _CHECKPOINTS in relpath.split("/")


def _done_last(relpaths):
  """DONE.json files after every other file: a stage counts as finished only once its outputs
  are all there."""
  return sorted(relpaths, key=lambda p: (os.path.basename(p) == "DONE.json", p))


@dataclasses.dataclass
class Workdir:
  """`path`: the local directory every stage writes its files to. `url`: the run's home when it
  is remote (None for a local workdir, where there is nothing to copy)."""

  path: str
  url: str | None = None
  # relpath -> the version of each file as last copied, so a copy moves only what changed:
  # (size, mtime) of local files pushed, the remote generation of files pulled.
  _pushed: dict = dataclasses.field(default_factory=dict, repr=False)
  _pulled: dict = dataclasses.field(default_factory=dict, repr=False)

  def checkpoints(self, stage: str) -> str:
    """Where Orbax keeps `stage`'s checkpoints: at the URL itself when there is one."""
    if self.url:
      return f"{self.url.rstrip('/')}/{stage}/{_CHECKPOINTS}"
    return os.path.join(self.path, stage, _CHECKPOINTS)

  def pull(self) -> int:
    """Copies the URL's files (not its checkpoints) that changed there since this process last
    copied them (all of them the first time); returns how many."""
    if not self.url:
      return 0
    fs, root = _filesystem(self.url)
    fs.invalidate_cache()  # listings cached earlier miss what process 0 has copied up since
    if not fs.exists(root):
      return 0
    copied = 0
    for remote, info in fs.find(root, detail=True).items():
      rel = remote[len(root) :].lstrip("/")
      if rel in ("", LOCK_NAME) or _is_checkpoint_file(rel) or info.get("type") == "directory":
        continue
      local = os.path.join(self.path, rel)
      version = info.get("generation") or info.get("mtime") or info.get("size")
      if self._pulled.get(rel) == version and os.path.exists(local):
        continue
      os.makedirs(os.path.dirname(local), exist_ok=True)
      fs.get_file(remote, local + ".part")
      os.replace(local + ".part", local)
      self._pulled[rel] = version
      st = os.stat(local)
      self._pushed[rel] = (st.st_size, st.st_mtime)  # no need to copy it back up
      copied += 1
    return copied

  def push(self) -> int:
    """Copies the local files that changed since the last copy up to the URL (process 0 only;
    the others' files are the same); returns how many."""
    if not self.url or not distributed.is_writer():
      return 0
    fs, root = _filesystem(self.url)
    changed = {}
    for dirpath, dirnames, filenames in os.walk(self.path):
      dirnames[:] = [d for d in dirnames if d != _CHECKPOINTS]
      for name in filenames:
        local = os.path.join(dirpath, name)
        rel = os.path.relpath(local, self.path)
        if name.endswith((".tmp", ".part")) or name.startswith(".write_probe"):
          continue
        st = os.stat(local)
        if self._pushed.get(rel) != (st.st_size, st.st_mtime):
          changed[rel] = (st.st_size, st.st_mtime)
    for rel in _done_last(changed):
      fs.put_file(os.path.join(self.path, rel), f"{root}/{rel}")
      self._pushed[rel] = changed[rel]
    return len(changed)


def open_workdir(workdir: str, cache_dir: str = "") -> Workdir:
  """The run's Workdir for the --workdir flag: a local path as it is; a URL with its local
  cache under `cache_dir` (default ~/.cache/dqo_jax), one per URL and process."""
  if not is_url(workdir):
    return Workdir(check_local(workdir))
  scheme, rest = workdir.split("://", 1)
  base = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dqo_jax")
  # One cache per process: two processes on one host must not write the same files.
  cache = os.path.join(base, scheme, rest.strip("/"), f"process_{jax.process_index()}")
  wd = Workdir(check_local(cache), workdir.rstrip("/"))
  fs, root = _filesystem(wd.url)
  # A probe write, as for a local workdir: it checks the bucket exists (nothing here creates
  # buckets) and that these credentials may write to it.
  probe = f"{root}/.write_probe.{os.uname().nodename}.{os.getpid()}"
  try:
    fs.pipe_file(probe, b"ok")
    fs.rm_file(probe)
  except Exception as e:  # gcsfs raises its own HTTP and auth errors
    first = str(e).splitlines()[0] if str(e) else ""
    raise UserError(
        f"--workdir={workdir} is not writable ({type(e).__name__}: {first}); check that the "
        "bucket exists and that your credentials may write to it "
        "(gcloud auth application-default login)"
    ) from None
  return wd
