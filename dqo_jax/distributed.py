"""Multi-host runs: one process per host, all driving one mesh over every host's devices.

`initialize` starts `jax.distributed` from the command-line flags, or on a TPU pod from the TPU
environment. Every process then runs the same program on the same config; each feeds only its
own rows of every batch (`dqo_jax.sharding.put_batch`), Orbax writes checkpoints from all of
them, and process 0 alone writes summaries, JSON and sample files (`is_writer`).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from dqo_jax.errors import UserError


def initialize(
    mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
  """Starts jax.distributed for a multi-process run; returns whether it did.

  With `coordinator_address`, all three values are required. Otherwise mode "auto" starts it
  from the TPU pod environment when there is one, and "off" keeps one process. Must run before
  any other JAX call.
  """
  if mode not in ("auto", "off"):
    raise UserError(f"--distributed={mode!r}; use auto or off")
  if coordinator_address or num_processes or process_id >= 0:
    if mode == "off":
      raise UserError("--distributed=off contradicts --coordinator_address: drop one of them")
    if not (coordinator_address and num_processes > 0 and 0 <= process_id < num_processes):
      raise UserError(
          "a multi-process run needs all of --coordinator_address=HOST:PORT, --num_processes=N "
          f"and --process_id in [0, N) (got {coordinator_address!r}, {num_processes}, "
          f"{process_id})"
      )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if mode == "auto" and on_tpu_pod(os.environ):
    jax.distributed.initialize()
    return True
  return False


def on_tpu_pod(env) -> bool:
  """Whether `env` describes a multi-host TPU job, where jax.distributed finds the coordinator
  and this host's index itself: several worker hostnames, or a multislice coordinator. A single host, or libtpu's placeholder text where no TPU is found (it writes
  "WARNING: could not determine ..." into TPU_WORKER_HOSTNAMES), is not one."""
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
  return len(hosts) > 1 and all(re.fullmatch(r"[A-Za-z0-9.\-]+", h.strip()) for h in hosts)


def is_writer() -> bool:
  """Whether this process writes summaries and files other than checkpoints: process 0, since
  every process computes the same replicated results."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (e.g. for a file process 0 writes); no-op alone."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(tree):
  """Device arrays -> numpy, gathering the rows other processes hold when there are several."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)
