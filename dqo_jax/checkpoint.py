"""Orbax checkpoints for every training stage: save every N steps, keep the last k, resume.

Saves are asynchronous: `save` returns once the state is copied to host memory and the files are
written in the background (`close` waits for them). Orbax writes a step to a temporary directory
and renames it when complete (on GCS, where there is no rename, it marks it with
commit_success.txt), so a save cut short is never listed as a step. A step directory that lists
but does not restore (a truncated or corrupted file) is set aside by `restore_latest`, which then
falls back to the step before.

Only Orbax reads checkpoints: nothing a user receives from elsewhere is ever unpickled.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from dqo_jax.errors import UserError

# What a step directory that failed to restore is renamed to: not a step name, so Orbax skips it.
UNREADABLE_SUFFIX = ".unreadable"


def as_path(path) -> epath.Path:
  """A local path made absolute; a URL such as gs://bucket/dir kept as it is (abspath would
  turn it into <cwd>/gs:/bucket/dir)."""
  path = os.fspath(path)
  if "://" in path:
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


class Checkpoints:
  """A `CheckpointManager` over `directory` (a local path or a gs:// URL) holding one state
  pytree per saved step."""

  def __init__(self, directory, *, every: int, keep: int = 2):
    self.directory = as_path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            enable_async_checkpointing=True,
            # Temporary directories of saves cut short by kill -9 or a preemption.
            cleanup_tmp_directories=True,
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: run the stage that writes it")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def restore_latest(self, abstract_state, warn) -> tuple[int, object]:
    """(step, state) of the newest step that restores, or (0, None) when there is none.

    Newer steps that fail to restore are renamed to `<step>.unreadable` (so the run can save
    that step again), each with a `warn(line)` naming it. If no step restores, nothing is renamed
    and UserError says why: a model or optimizer that changed shape fails every step alike.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, step)
      except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
        failed.append((step, e))
        continue
      for bad, e in failed:
        self._set_aside(bad, e, warn)
      if failed:
        self.manager.reload()
      return step, state
    if failed:
      step, e = failed[0]
      raise UserError(
          f"no checkpoint in {self.directory} restores (step {step}: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); if the model or optimizer changed, "
          "use a new --workdir"
      )
    return 0, None

  def _set_aside(self, step: int, error: Exception, warn):
    bad = self.step_dir(step)
    moved = bad.parent / f"{bad.name}{UNREADABLE_SUFFIX}"
    if jax.process_index() == 0:
      moved.rmtree(missing_ok=True)
      bad.rename(moved)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside {bad}")
    warn(
        f"warning: the checkpoint {bad} does not restore ({type(error).__name__}); "
        f"moved to {moved}, resuming from an earlier step"
    )

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every host has agreed to save after a preemption notice (the JAX
    distributed preemption service; always False in a single process)."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self):
    """Waits for pending asynchronous saves; safe to call twice."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def restore_params(directory, abstract_params_state, warn=print):
  """Reads the newest checkpoint of a finished stage, e.g. the SFT policy for DQO. A newest step
  that does not restore is set aside with a `warn(line)` and the step before is read, as when a
  training stage resumes (`Checkpoints.restore_latest`)."""
  ckpt = Checkpoints(directory, every=1)
  try:
    _, state = ckpt.restore_latest(abstract_params_state, warn)
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run the stage that writes it")
  return state
