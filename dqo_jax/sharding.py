"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it.

Parameters and activations carry logical axis names (see `dqo_jax.model`); `config.mesh.rules`
maps each name onto mesh axes. Batches are split over ("data", "fsdp"); the token axis ("length")
is never sharded, since the lambda-return scan runs over it.

With several processes (one per host), every process holds the same mesh over all devices and
feeds only the rows of each batch that its own devices hold (`put_batch`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dqo_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the mesh from `config.mesh` sizes; one size may be -1 (the remaining devices)."""
  devices = devices if devices is not None else jax.devices()
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError("config.mesh: at most one of data/fsdp/tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"config.mesh: {len(devices)} devices do not divide by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
        f"devices, found {len(devices)}; set one axis to -1"
    )
  # Auto axes: shardings are propagated by XLA, and scanning the (unsharded) token axis is fine.
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_rules(mesh_cfg) -> tuple[tuple[str, tuple[str, ...] | str | None], ...]:
  return tuple(
      (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
      for name, axes in mesh_cfg.rules
  )


def state_shardings(abstract_boxed_state, mesh: Mesh, rules):
  """NamedShardings for a state whose parameters are `nn.LogicallyPartitioned` boxes.

  A dimension that a rule's mesh axes do not divide (e.g. Qwen2-7B's 28 heads over tensor=8)
  is replicated over those axes instead: jit refuses uneven argument shardings.
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed_state), rules)
  shapes = nn.meta.unbox(abstract_boxed_state)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, divisible_spec(spec, x.shape, mesh)),
      specs,
      shapes,
      is_leaf=lambda x: isinstance(x, P),
  )


def divisible_spec(spec: P, shape, mesh: Mesh) -> P:
  """`spec` keeping, per dimension, the leading mesh axes whose sizes divide it."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]):
        break
      kept.append(name)
      size *= mesh.shape[name]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


# (mesh, rules) while a train step is traced; None elsewhere (sampling, init, tests of the model).
_PLACEMENT: contextvars.ContextVar = contextvars.ContextVar("activation_placement", default=None)


@contextlib.contextmanager
def activation_constraints(mesh: Mesh, rules):
  """While tracing under it, `constrain` places activations on `mesh` by `rules`.

  Not a global mesh (`jax.set_mesh`): under one, flax applies its own constraints to freshly
  initialised DenseGeneral kernels at their flattened shape, which fails.
  """
  token = _PLACEMENT.set((mesh, rules))
  try:
    yield
  finally:
    _PLACEMENT.reset(token)


def logical_spec(names: tuple[str | None, ...], shape) -> tuple[Mesh, P] | None:
  """The mesh and partition spec of an activation with logical axis `names` while a train step
  is traced (`activation_constraints`); None elsewhere."""
  placement = _PLACEMENT.get()
  if placement is None:
    return None
  mesh, rules = placement
  return mesh, divisible_spec(nn.logical_to_mesh_axes(names, rules), shape, mesh)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """`x` pinned to the mesh by the logical axis `names` of its dimensions (a dimension that its
  mesh axes do not divide is left whole); `x` unchanged outside `activation_constraints`."""
  placed = logical_spec(names, x.shape)
  if placed is None:
    return x
  mesh, spec = placed
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def batch_rows(mesh: Mesh | None) -> int:
  """How many devices a batch is split over: its row count must divide by this."""
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(global_rows: int, mesh: Mesh) -> np.ndarray:
  """Indices of the rows of a [global_rows, ...] batch that this process's devices hold.

  One process: every row. Several: the contiguous block that `batch_sharding` assigns to this
  process's devices (a process's devices may hold several blocks on an odd mesh: all listed).
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  starts = sorted({idx[0].indices(global_rows)[:2] for idx in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts])


def put_batch(batch, mesh: Mesh):
  """A host batch (numpy arrays [B, ...], the same on every process) as jax.Arrays split over
  the batch axes; each process copies only the rows its own devices hold."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  mine = local_rows(rows, mesh)
  sh = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sh, x[mine], (rows, *x.shape[1:])), batch
  )


def rebox(boxed, values):
  """`values` wrapped in the logical-partitioning boxes of `boxed` (same tree structure)."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree.map(
      lambda box, v: box.replace_boxed(v) if is_box(box) else v, boxed, values, is_leaf=is_box
  )
