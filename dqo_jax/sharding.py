"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it.

Parameters carry logical axis names (see `dqo_jax.model`); `config.mesh.rules` maps each name
onto mesh axes. Batches are split over ("data", "fsdp"); the token axis is never sharded, since
the lambda-return scan runs over it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the mesh from `config.mesh` sizes; one size may be -1 (the remaining devices)."""
  devices = devices if devices is not None else jax.devices()
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("config.mesh: at most one of data/fsdp/tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh: {len(devices)} devices do not divide by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
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
  """NamedShardings for a state whose parameters are `nn.LogicallyPartitioned` boxes."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
