"""Two processes on this machine (4 CPU devices each, gloo collectives) train as one 8-device
run does: same per-step losses and final parameters; only process 0 writes summaries."""

import os
import socket
import subprocess
import sys

import numpy as np

import multihost_fit
from dqo_jax.metrics import read_scalars

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(workdir):
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
  )
  address = f"localhost:{_free_port()}"
  script = os.path.join(HERE, "multihost_fit.py")
  procs = [
      subprocess.Popen(
          [sys.executable, script, str(workdir), address, "2", str(i)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"


def _load(workdir):
  with np.load(os.path.join(workdir, multihost_fit.PARAMS_FILE)) as f:
    params = dict(f)
  return read_scalars(os.path.join(workdir, "tb")), params


def test_two_processes_train_as_one_8_device_process(tmp_path):
  multihost_fit.train(str(tmp_path / "one"))
  _two_processes(tmp_path / "two")
  (scalars_1, params_1), (scalars_2, params_2) = _load(tmp_path / "one"), _load(tmp_path / "two")
  assert len(os.listdir(tmp_path / "two" / "tb")) == 1  # one writer: process 0
  assert [s for s, _ in scalars_2["policy_loss"]] == list(range(1, multihost_fit.STEPS + 1))
  for tag, series in scalars_1.items():
    np.testing.assert_allclose(
        [v for _, v in scalars_2[tag]], [v for _, v in series], rtol=2e-4, atol=1e-6, err_msg=tag
    )
  assert params_1.keys() == params_2.keys() and params_1
  for k in params_1:
    np.testing.assert_allclose(params_2[k], params_1[k], rtol=1e-3, atol=1e-5, err_msg=k)
  # Orbax wrote the last step's checkpoint from both processes.
  assert "3" in os.listdir(tmp_path / "two" / "checkpoints")
