"""What the stages leave in a workdir for each other: file names, writers and readers. A stage
reads another stage's outputs through here, never through that stage's module."""

from __future__ import annotations

import os

from dqo_jax import methods
from dqo_jax.checkpoint import restore_params
from dqo_jax.data.offline import FIELDS as SAMPLE_FIELDS
from dqo_jax.data.offline import read_records, write_records
from dqo_jax.stages.context import Context
from dqo_jax.train.build import build_train_step

SAMPLES_FILE = "samples.array_record"  # the sample stage's offline dataset
POTENTIALS_FILE = "potentials.array_record"  # the rollouts stage's Phi(s_t) per sample
POTENTIAL_FIELDS = ("boundaries", "potentials")


def write_samples(ctx: Context, records: list[dict], directory: str = "sample") -> None:
  """The offline dataset, in DIR/sample/ (or, for `train.rounds` > 1, a round's directory)."""
  write_records(os.path.join(ctx.stage_dir(directory), SAMPLES_FILE), records)


def read_samples(ctx: Context, directory: str = "sample") -> list[dict]:
  path = os.path.join(ctx.workdir, directory, SAMPLES_FILE)
  return read_records(path, fields=SAMPLE_FIELDS)


def write_potentials(ctx: Context, records: list[dict]) -> None:
  path = os.path.join(ctx.stage_dir("rollouts"), POTENTIALS_FILE)
  write_records(path, records, POTENTIAL_FIELDS)


def read_potentials(ctx: Context) -> list[dict]:
  path = os.path.join(ctx.workdir, "rollouts", POTENTIALS_FILE)
  return read_records(path, stage="rollouts", fields=POTENTIAL_FIELDS)


def trained_policy_params(ctx: Context, sft_params=None, directory: str | None = None):
  """The trained policy of `config.method`, read from its run's newest checkpoint (or that of
  `directory`, e.g. an earlier round's; with LoRA: its adapters, folded into the SFT policy,
  their base: `sft_params()`, by default read from the SFT checkpoint)."""
  step = build_train_step(ctx.config, ctx.model_cfg, ctx.mesh)
  directory = directory or methods.run_name(ctx.config)
  state = restore_params(ctx.checkpoint_dir(directory), step.abstract_state)
  base = step.base_of((sft_params or ctx.sft_params)()) if step.adapters else None
  return step.policy_params(state, base)
