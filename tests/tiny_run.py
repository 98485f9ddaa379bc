"""The command line of the pipeline on the embedded config's reduced variant, for the tests
that run it as a user does: in a subprocess, from the repository root."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir, *args) -> list[str]:
  return [
      sys.executable,
      "-m",
      "dqo_jax.main",
      "--config=configs/arith.py:tiny",
      f"--workdir={workdir}",
      *map(str, args),
  ]
