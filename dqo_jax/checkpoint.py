"""Orbax checkpoints for every training stage: save every N steps, keep the last k, resume.

Only Orbax reads checkpoints: nothing a user receives from elsewhere is ever unpickled.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """A `CheckpointManager` over `directory` holding one state pytree per saved step."""

  def __init__(self, directory: str, *, every: int, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: run the stage that writes it")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self):
    """Waits for pending asynchronous saves; safe to call twice."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def restore_params(directory: str, abstract_params_state):
  """Reads the newest checkpoint of a finished stage, e.g. the SFT policy for DQO."""
  ckpt = Checkpoints(directory, every=1)
  try:
    return ckpt.restore(abstract_params_state)
  finally:
    ckpt.close()
