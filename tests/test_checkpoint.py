"""Checkpoints carry a digest of the arrays they saved: a step damaged in place (bytes overwritten,
the same size) is detected on restore and set aside for the step before, on a local disk and in
a gs:// bucket; an error of the storage (permission, too many open files, a bucket out of reach)
stops with one line and sets nothing aside."""

import errno
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import fake_gcs
import faults
from dqo_jax.checkpoint import UNREADABLE_SUFFIX, Checkpoints, state_digest
from dqo_jax.errors import UserError


def _state(seed):
  """Parameters and moments sharded over two devices, in the dtypes a train state holds."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("x")))
  rng = np.random.default_rng(seed)
  return dict(
      params=dict(
          w=shard(rng.normal(size=(64, 256)).astype(np.float32)),
          b=shard(rng.normal(size=(128,)).astype(jnp.bfloat16)),
      ),
      mu=shard(rng.normal(size=(256, 64)).astype(np.float32)),
      step=jax.device_put(np.int32(seed), NamedSharding(mesh, PartitionSpec())),
  )


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _equal(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def _save(directory, states):
  ckpt = Checkpoints(directory, every=1, keep=len(states))
  for step, state in enumerate(states, 1):
    ckpt.save(step, state)
  ckpt.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Two steps saved, and their states."""
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  states = [_state(1), _state(2)]
  _save(directory, states)
  return directory, states


def _restore_latest(directory, abstract):
  warnings = []
  ckpt = Checkpoints(directory, every=1)
  try:
    step, state = ckpt.restore_latest(abstract, warnings.append)
  finally:
    ckpt.close()
  return step, state, warnings


def test_every_changed_word_changes_the_digest():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32))
  base = np.asarray(state_digest(x))[0]
  for i, j in ((0, 0), (3, 7), (7, 15)):
    for flip in (1, 1 << 31):  # the lowest and the highest bit
      bits = np.asarray(x).view(np.uint32).copy()
      bits[i, j] ^= flip
      changed = np.asarray(state_digest(jnp.asarray(bits.view(np.float32))))[0]
      assert (changed[:2] != base[:2]).all()
  # Two words swapped: the same values at other indices.
  swapped = np.asarray(x).copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  assert (np.asarray(state_digest(jnp.asarray(swapped)))[0, :2] != base[:2]).all()


@pytest.mark.parametrize("seed", range(6))
def test_bytes_overwritten_in_place_are_detected_and_the_step_before_restored(
    saved, tmp_path, seed
):
  source, (first, _) = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  path, offset = faults.damage_in_place(directory / "2", random.Random(seed))
  step, state, warnings = _restore_latest(directory, _abstract(first))
  assert step == 1 and _equal(state, first), (path, offset)
  assert len(warnings) == 1, warnings
  assert f"the checkpoint {directory / '2'} does not restore" in warnings[0], warnings
  assert "differ from the digest" in warnings[0] or "Error" in warnings[0], warnings
  assert sorted(os.listdir(directory)) == ["1", f"2{UNREADABLE_SUFFIX}"]


def test_when_every_step_is_damaged_all_are_set_aside_and_the_stage_starts_afresh(saved, tmp_path):
  source, (first, _) = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  rng = random.Random(0)
  for step in ("1", "2"):
    faults.damage_in_place(directory / step, rng)
  step, state, warnings = _restore_latest(directory, _abstract(first))
  assert (step, state) == (0, None)
  assert len(warnings) == 2 and all("training this stage afresh" in w for w in warnings)
  assert sorted(os.listdir(directory)) == [f"1{UNREADABLE_SUFFIX}", f"2{UNREADABLE_SUFFIX}"]


def test_a_changed_dtype_is_no_damage_and_renames_nothing(saved):
  directory, (first, _) = saved
  abstract = _abstract(first)
  mu = first["mu"]
  abstract["mu"] = jax.ShapeDtypeStruct(mu.shape, jnp.bfloat16, sharding=mu.sharding)
  with pytest.raises(
      UserError,
      match=r"no checkpoint in .* restores \(step 2: ValueError: the "
      r"checkpoint holds \['mu'\] in another dtype",
  ):
    _restore_latest(directory, abstract)
  assert sorted(os.listdir(directory)) == ["1", "2"]


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied", "default/manifest.ocdbt"),
        OSError(errno.EMFILE, "Too many open files"),
        ValueError("Error reading gs://b/x/2/default: UNAVAILABLE: HTTP response code: 503"),
    ],
    ids=["EACCES", "EMFILE", "bucket-unavailable"],
)
def test_a_storage_error_stops_the_run_and_sets_nothing_aside(saved, monkeypatch, error):
  directory, (first, _) = saved

  def fail(self, abstract_state, step=None):
    raise error

  monkeypatch.setattr(Checkpoints, "restore", fail)
  with pytest.raises(UserError, match=r"cannot read the checkpoint .*/2 .* nothing was set aside"):
    _restore_latest(directory, _abstract(first))
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_a_step_that_does_not_decode_is_set_aside(saved, tmp_path, monkeypatch):
  source, (first, _) = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  restore = Checkpoints.restore

  def fail_at_2(self, abstract_state, step=None):
    if step == 2:
      raise ValueError("Error reading local file: DATA_LOSS: Invalid manifest")
    return restore(self, abstract_state, step)

  monkeypatch.setattr(Checkpoints, "restore", fail_at_2)
  step, state, warnings = _restore_latest(directory, _abstract(first))
  assert step == 1 and _equal(state, first) and "(ValueError)" in warnings[0]
  assert sorted(os.listdir(directory)) == ["1", f"2{UNREADABLE_SUFFIX}"]


def test_in_a_bucket_too(tmp_path, monkeypatch):
  server, url = fake_gcs.serve(["runs"])
  store = server.RequestHandlerClass.store
  for key, value in fake_gcs.environment(url).items():
    monkeypatch.setenv(key, value)
  first, second = _state(1), _state(2)
  try:
    _save("gs://runs/ck", [first, second])
    with store.lock:
      data = [k for k in store.objects if k[1].startswith("ck/2/") and "/d/" in k[1]]
      key = max(data, key=lambda k: len(store.objects[k][0]))
      content, meta = store.objects[key]
      damaged = bytearray(content)
      faults.overwrite(damaged, random.Random(0))
      store.objects[key] = (bytes(damaged), meta)
    step, state, warnings = _restore_latest("gs://runs/ck", _abstract(first))
    with store.lock:
      names = {n for _, n in store.objects}
  finally:
    server.shutdown()
  assert step == 1 and _equal(state, first)
  assert len(warnings) == 1 and "differ from the digest" in warnings[0], warnings
  assert "ck/2.unreadable/commit_success.txt" in names
  assert not any(n.startswith("ck/2/") for n in names)
