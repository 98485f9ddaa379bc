"""`--redo=STAGE[,STAGE]`: runs finished stages again by removing what they wrote.

A stage's outputs, and those of every stage that read them, are removed (DONE.json files first,
so a redo cut short leaves stages to run, never a stage marked done without its files):

  sft       everything below: the samples, rollouts, every method's run and every evaluation
  sample    the rollouts, every run that trains on the samples, their evaluations
  rollouts  the DQO process-supervision run (dqo_ps) and its evaluation
  train     the run of `config.method` (with its earlier rounds) and its evaluation
  eval      the evaluations of the SFT policy and of `config.method`

Only the files the pipeline writes are removed (`PIPELINE_FILES`); anything else a user put in
a stage's directory stays. With a gs:// workdir they are removed at the URL as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from etils import epath

from dqo_jax import distributed, methods
from dqo_jax.errors import UserError
from dqo_jax.metrics import write_json_atomic
from dqo_jax.stages.context import STAGES, stage_output
from dqo_jax.workdir import Workdir

# What the stages write in their directories; DONE.json first (see above).
PIPELINE_FILES = (
    "DONE.json",
    "STOPPED.json",
    "checkpoints",
    "tb",
    "samples.array_record",
    "potentials.array_record",
    "result.json",
    "skipped_updates.json",
)


def check(redo: list[str], stages: list[str]) -> None:
  """UserError unless every stage in `redo` is one that this run runs."""
  for stage in redo:
    if stage not in STAGES:
      raise UserError(f"--redo={stage}: no such stage; choose from {', '.join(STAGES)}")
    if stage not in stages:
      raise UserError(
          f"--redo={stage}: config.stages={','.join(stages)} does not run it; add it there"
      )


def invalidated(config, redo: list[str]) -> list[str]:
  """The directories (relative to the workdir) whose outputs a redo of `redo` removes."""
  evals = lambda runs: [os.path.join("eval", r) for r in runs]
  runs, sample_runs = methods.all_runs(), methods.all_runs(sample_only=True)
  out = []
  for stage in redo:
    if stage == "sft":
      out += ["sft", "sample", "rollouts", *runs, *evals(("sft", *runs))]
    elif stage == "sample":
      out += ["sample", "rollouts", *sample_runs, *evals(sample_runs)]
    elif stage == "rollouts":
      out += ["rollouts", *methods.rollout_runs(), *evals(methods.rollout_runs())]
    elif stage == "train":
      out += [stage_output(config, "train"), stage_output(config, "eval")]
    else:
      out += evals(("sft", methods.run_name(config)))
  return list(dict.fromkeys(out))


def redo(config, wd: Workdir, stages: list[str]) -> list[str]:
  """Removes the outputs of `stages` and of the stages after them that read them, from every
  process's local copy and (process 0) from the URL; returns the directories that had any.
  Runs after the first `wd.pull()`, which would otherwise bring the files back."""
  labels = invalidated(config, stages)
  linked = [l for l in labels if os.path.islink(os.path.join(wd.path, l))]
  if linked:
    raise UserError(
        f"--redo would remove files under {', '.join(linked)}, linked from a shared workdir "
        f"(dqo_jax.compare's base: {os.path.realpath(os.path.join(wd.path, linked[0]))}); redo "
        "the stage there"
    )
  removed = []
  for name in PIPELINE_FILES:
    for label in labels:
      if remove(wd, os.path.join(label, name)):
        removed.append(label)
  for label in labels:  # the earlier rounds of `train.rounds` > 1, whole
    local = os.path.join(wd.path, label)
    rounds = (
        [e for e in os.listdir(local) if re.fullmatch(r"round\d+", e)]
        if os.path.isdir(local)
        else []
    )
    for entry in rounds:
      if remove(wd, os.path.join(label, entry)):
        removed.append(label)
  _drop_results(wd, [os.path.relpath(l, "eval") for l in labels if l.startswith("eval")])
  wd.push()
  distributed.barrier("redo")  # nobody reads the workdir before the outputs are gone
  return list(dict.fromkeys(removed))


def remove(wd: Workdir, relpath: str) -> bool:
  """Removes `relpath` from the local directory and (process 0) the URL; whether it existed.

  After the run's first copy from the URL the local directory holds every file there but the
  checkpoints, so the URL is asked only about those and about what exists here."""
  local = os.path.join(wd.path, relpath)
  found = os.path.exists(local)
  if wd.url and distributed.is_writer() and (found or os.path.basename(relpath) == "checkpoints"):
    remote = epath.Path(f"{wd.url}/{relpath}")
    if remote.exists():
      found = True
      remote.rmtree() if remote.is_dir() else remote.unlink()
  if os.path.isdir(local):
    shutil.rmtree(local)
  elif os.path.exists(local):
    os.remove(local)
  return found


def _drop_results(wd: Workdir, names: list[str]) -> None:
  """Removes the redone evaluations from DIR/results.json, which gathers every method's."""
  path = os.path.join(wd.path, "results.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    results = json.load(f)
  kept = {k: v for k, v in results.items() if k not in names}
  if kept == results:
    return
  if kept:
    write_json_atomic(path, kept)
  else:
    remove(wd, "results.json")
