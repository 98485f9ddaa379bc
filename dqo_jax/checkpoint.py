"""Orbax checkpoints for every training stage: save every N steps, keep the last k, resume.

Saves are asynchronous: `save` returns once the state is copied to host memory and the files are
written in the background (`close` waits for them). Orbax writes a step to a temporary directory
and renames it when complete (on GCS, where there is no rename, it marks it with
commit_success.txt), so a save cut short is never listed as a step.

Every step also holds a digest of the state it saved (item `digest` beside the state's item
`default`): two 32-bit sums and a dtype code per array, computed on the devices from the arrays
themselves when the step is saved, each device over its own shards (so each host over what it
writes, then a 32-bit all-reduce), and written by Orbax with the state, in the same commit.
`restore` recomputes it from the restored arrays and raises `Damaged` if they differ.
`restore_latest` sets a step that does not restore aside and falls back to the step before; an
error of the storage itself (permission, too many open files, a bucket out of reach) stops the
run with one line instead, and sets nothing aside.

Only Orbax reads checkpoints: nothing a user receives from elsewhere is ever unpickled.
"""

from __future__ import annotations

import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from dqo_jax.errors import UserError

# What a step directory that failed to restore is renamed to: not a step name, so Orbax skips it.
UNREADABLE_SUFFIX = ".unreadable"
# The Orbax items of a step: the state, and its digest (absent from steps saved before digests).
STATE, DIGEST = "default", "digest"
# Words of the status codes TensorStore and gcsfs put in the message of an error of the storage
# rather than of the bytes read (absl status names, HTTP reasons).
_STORAGE_ERRORS = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "Forbidden",
    "Too many open files",
)


class Damaged(Exception):
  """A checkpoint whose bytes are wrong: its arrays differ from its digest."""


def as_path(path) -> epath.Path:
  """A local path made absolute; a URL such as gs://bucket/dir kept as it is (abspath would
  turn it into <cwd>/gs:/bucket/dir)."""
  path = os.fspath(path)
  if "://" in path:
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def _words(x):
  """The bits of `x` as uint32 words, in the shape of `x` (a trailing 2 for 8-byte types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits >= 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _fmix(h):
  """MurmurHash3's 32-bit finaliser: spreads every bit of an index over the word."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _dtype_code(dtype) -> int:
  return zlib.crc32(str(dtype).encode())


def _array_digest(x):
  """uint32[3]: two sums over the elements of (word ^ a(i)) * b(i) mod 2^32, for two pairs of
  index hashes a, b (b odd), and a code of the dtype. Any one changed word changes both sums (an
  odd factor is invertible mod 2^32); more changes cancel in both with a chance of about 2^-64.
  Elementwise and a sum, without a reshape: a sharded array is hashed where its shards are."""
  code = _dtype_code(x.dtype)
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride = (stride * w.shape[axis]) % 2**32
  lanes = []
  for seed in (0x9E3779B9, 0x7F4A7C15):
    a = _fmix(index ^ jnp.uint32(seed))
    b = _fmix(a + jnp.uint32(seed)) | jnp.uint32(1)
    lanes.append(jnp.sum((w ^ a) * b, dtype=jnp.uint32))
  return jnp.stack(lanes + [jnp.uint32(code)])


_leaf_digest = jax.jit(_array_digest)
_leaves_digest = jax.jit(lambda leaves: jnp.stack([_array_digest(x) for x in leaves]))


def state_digest(state):
  """uint32[leaves, 3]: the `_array_digest` of every array of `state`, in `jax.tree.leaves`
  order. One computation where the arrays share their devices (a train state on its mesh: the
  training thread only dispatches it); one per array, gathered on the host, where they do not."""
  leaves = jax.tree.leaves(state)
  if not leaves:
    return np.zeros((0, 3), np.uint32)
  devices = {frozenset(x.sharding.device_set) for x in leaves if isinstance(x, jax.Array)}
  if len(devices) <= 1:
    return _leaves_digest(leaves)
  return np.stack([np.asarray(_leaf_digest(x)) for x in leaves])


def is_storage_error(e: BaseException) -> bool:
  """True for an error of the storage (permission, too many open files, a bucket out of reach):
  it says nothing about the checkpoint's bytes. A missing file is no such error: a step that
  lists but lacks a file is damaged."""
  if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
    return False
  if isinstance(e, OSError):
    return True
  if type(e).__name__ == "HttpError":  # gcsfs: 401, 429 and 5xx; 403 and 404 come as OSErrors
    return True
  return any(word in str(e) for word in _STORAGE_ERRORS)


class Checkpoints:
  """A `CheckpointManager` over `directory` (a local path or a gs:// URL) holding one state
  pytree and its digest per saved step."""

  def __init__(self, directory, *, every: int, keep: int = 2):
    self.directory = as_path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=(STATE, DIGEST),
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
    """Restores into the shapes, dtypes and shardings of `abstract_state`; raises `Damaged`
    if the arrays restored differ from the digest saved with them."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: run the stage that writes it")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {STATE: ocp.args.StandardRestore(target)}
    has_digest = (self.step_dir(step) / DIGEST).exists()
    if has_digest:
      n = len(jax.tree.leaves(target))
      items[DIGEST] = ocp.args.StandardRestore({DIGEST: np.zeros((n, 3), np.uint32)})
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception:
      _quiet_closed_loops()
      raise
    if has_digest:
      _verify(restored[STATE], restored[DIGEST][DIGEST])
    return restored[STATE]

  def restore_latest(self, abstract_state, warn) -> tuple[int, object]:
    """(step, state) of the newest step that restores, or (0, None) when there is none.

    Newer steps that fail to restore are renamed to `<step>.unreadable` (so the run can save
    that step again), each with a `warn(line)` naming it; so are all steps if every one is
    damaged (its arrays differ from its digest, or TensorStore found its data corrupt), and the
    stage starts afresh. An error of the storage stops with UserError and renames nothing; so
    does a failure of every step for other reasons: a model or optimizer that changed shape
    fails them alike.
    """
    failed = []
    steps = sorted(self.manager.all_steps(), reverse=True)
    if steps:
      self._check_layer_layout(steps[0], abstract_state)
    for step in steps:
      try:
        state = self.restore(abstract_state, step)
      except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
        if is_storage_error(e):
          raise UserError(
              f"cannot read the checkpoint {self.step_dir(step)} ({_summary(e)}); nothing was "
              "set aside: check the disk, bucket or credentials, then rerun the same command"
          ) from None
        failed.append((step, e))
        continue
      self._set_aside(failed, warn, "resuming from an earlier step")
      return step, state
    if failed and all(_proven_damaged(e) for _, e in failed):
      self._set_aside(failed, warn, "training this stage afresh")
      return 0, None
    if failed:
      step, e = failed[0]
      raise UserError(
          f"no checkpoint in {self.directory} restores (step {step}: {_summary(e)}); if the "
          "model or optimizer changed, use a new --workdir; if the checkpoints are damaged, "
          "move the directory aside to train this stage afresh"
      )
    return 0, None

  def _check_layer_layout(self, step: int, abstract_state) -> None:
    """One line naming the setting, where a restore would fail on every array: the checkpoint's
    decoder layers are stacked ("layers") and the model's are not, or the reverse
    (`model.scan_layers`)."""
    meta = self.step_dir(step) / STATE / "_METADATA"
    if not meta.exists():
      return
    text = meta.read_text()
    keys = {
        k.key
        for path, _ in jax.tree_util.tree_leaves_with_path(abstract_state)
        for k in path
        if isinstance(k, jax.tree_util.DictKey)
    }
    saved = ("'layers'" in text, "'layer_0'" in text)  # (stacked, per layer)
    want = ("layers" in keys, "layer_0" in keys)
    if saved != want and any(saved) and any(want):
      scanned = want[0]
      raise UserError(
          f"the checkpoints in {self.directory} hold the decoder layers "
          f"{'per layer' if scanned else 'stacked'} and this run's model has them "
          f"{'stacked' if scanned else 'per layer'}: rerun with "
          f"--config.model.scan_layers={not scanned}"
      )

  def _set_aside(self, failed: list, warn, then: str):
    """Renames the steps of `failed` [(step, error)] to `<step>.unreadable`."""
    for step, error in failed:
      bad = self.step_dir(step)
      moved = bad.parent / f"{bad.name}{UNREADABLE_SUFFIX}"
      if jax.process_index() == 0:
        moved.rmtree(missing_ok=True)
        bad.rename(moved)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside {bad}")
      why = str(error) if isinstance(error, Damaged) else type(error).__name__
      warn(f"warning: the checkpoint {bad} does not restore ({why}); moved to {moved}, {then}")
    if failed:
      self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every host has agreed to save after a preemption notice (the JAX
    distributed preemption service; always False in a single process)."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    if not (force or self.manager.should_save(step)):
      return False
    # Dispatched before the state's buffers are donated to the next step, read by Orbax's
    # copy to host with the state: the training thread never waits for it.
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(state),
            DIGEST: ocp.args.StandardSave({DIGEST: state_digest(state)}),
        }
    )
    return self.manager.save(step, args=args, force=force)

  def close(self):
    """Waits for pending asynchronous saves; safe to call twice."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def _summary(e: BaseException) -> str:
  """The type and gist of an error: TensorStore's end with the JSON of its whole spec."""
  first = str(e).splitlines()[0].split(" [tensorstore_spec")[0] if str(e) else ""
  first = first if len(first) <= 300 else first[:297] + "..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _proven_damaged(e: BaseException) -> bool:
  """Whether `e` proves a checkpoint's bytes wrong: its digest, or TensorStore's own checks
  (the CRC-32C of OCDBT's tree nodes, decoders) found them so."""
  return isinstance(e, Damaged) or "DATA_LOSS" in str(e)


def _quiet_closed_loops():
  """After a read fails inside Orbax's restore, TensorStore calls back into the asyncio loop
  that Orbax has closed by then, and Python prints each callback as an unraisable 'Event loop is
  closed' traceback: dozens around the one line that says what failed. Only those are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "quiet_closed_loops", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.quiet_closed_loops = True
  sys.unraisablehook = hook


def _verify(state, saved):
  """Raises `Damaged` naming the arrays of `state` that differ from their `saved` digests, or
  ValueError if the checkpoint holds an array in another dtype (restoring it converted it)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  restored = np.asarray(state_digest(state))
  saved = np.asarray(saved)
  if restored.shape != saved.shape:
    raise Damaged(f"its digest lists {len(saved)} arrays, the state has {len(restored)}")
  for path, a, b in zip(paths, restored, saved):
    if a[2] != b[2]:
      raise ValueError(f"the checkpoint holds {path} in another dtype than the model's")
  differ = [p for p, a, b in zip(paths, restored, saved) if np.any(a != b)]
  if differ:
    raise Damaged(
        f"{len(differ)} of {len(paths)} arrays differ from the digest saved with them: "
        f"{', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}"
    )


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
