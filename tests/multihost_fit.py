"""A few DQO steps through `fit` with a tiny model on fixed synthetic batches, over a
(data 2, fsdp 2, tensor 2) mesh: run by test_multihost.py as each of two processes (4 devices
each), and called there in-process for the single-process 8-device reference.

    python tests/multihost_fit.py WORKDIR COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID
"""

import os
import sys

import jax
import ml_collections
import numpy as np

from dqo_jax import distributed, sharding
from dqo_jax.train.loop import fit

STEPS = 3
PARAMS_FILE = "policy_params.npz"


def train(workdir: str) -> None:
  """Trains; process 0 writes the final policy parameters to WORKDIR/policy_params.npz."""
  import test_train_step as t  # the tiny model, DQO step and batches of the step tests

  init_fn, step_fn, _, _ = t._dqo_setup()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  state, _ = fit(
      stage_dir=workdir,
      init_fn=init_fn,
      step_fn=step_fn,
      batch_at=lambda i: t._batch(np.random.default_rng(100 + i)),
      num_steps=STEPS,
      mesh=mesh,
      rules=t.RULES,
      rng=jax.random.key(0),
      checkpoint_cfg=ml_collections.ConfigDict(dict(every=2, keep=1)),
      max_nonfinite=10,
      log_every=1,
      desc=f"process {jax.process_index()}",
  )
  params = distributed.fetch(state.policy.params)  # collective: every process takes part
  if distributed.is_writer():
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(workdir, PARAMS_FILE), **flat)


if __name__ == "__main__":
  workdir, address, n, pid = sys.argv[1:]
  assert distributed.initialize("auto", address, int(n), int(pid))
  assert jax.process_count() == int(n) and jax.device_count() == 8
  train(workdir)
