"""Fault injection on the tiny pipeline (`configs/arith.py:tiny`): every round starts a fresh
workdir, disturbs its runs with 1 to 3 faults at random points, then runs the same command once
more, left alone. Faults:

  kill     SIGKILL at a random moment of a run
  term     SIGTERM at a random moment (the run saves the step it is at and stops)
  int      SIGINT, i.e. Ctrl-C, likewise
  corrupt  64 random bytes overwritten in place (same size) in the data files of the newest
           checkpoint of the stage in progress, between two runs (if none has one, a run is
           killed at its first or second checkpoint); damage that leaves what the checkpoint
           reads back as unchanged (it hit bytes no read touches) is undone and drawn again
  race     a second run started on the workdir soon after a first one

The last run of a round must end with final parameters (the newest SFT and DQO checkpoints)
equal bit for bit to those of a run never disturbed, or refuse with one line; damaged
checkpoints must be detected, and racing runs refused. A final state that differs from the
reference after a run that succeeded is a silent divergence, and there must be none.

    python tests/fault_injection.py --rounds 8 --seed 0

prints the table of docs/reliability.md; tests/test_fault_injection.py runs a reduced form.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import faults
import tiny_run
from tiny_run import ROOT

if ROOT not in sys.path:  # run as a script: only tests/ is on the path
  sys.path.insert(0, ROOT)
from dqo_jax.checkpoint import DIGEST, STATE  # noqa: E402

KINDS = ("kill", "term", "int", "corrupt", "race")
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
# More checkpoints than the tiny config's (every 5 steps, 2 kept) for the faults to land between.
OVERRIDES = ("--config.checkpoint.every=2", "--config.checkpoint.keep=2")
TRAINED = ("sft", "dqo")  # the stages whose final parameters are compared


@dataclasses.dataclass
class Tally:
  """What the rounds did: faults injected by kind, and how the rounds and faults ended."""

  rounds: int = 0
  injected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  equal: int = 0  # rounds whose last run succeeded with the reference's final parameters
  refused: list = dataclasses.field(default_factory=list)  # one-line errors of last runs
  diverged: int = 0  # last run succeeded, final parameters differ: silent divergence
  damage_detected: int = 0
  damage_missed: int = 0  # damaged checkpoints restored without a warning
  damage_inert: int = 0  # damage redrawn: it hit bytes no read touches
  races_refused: int = 0
  race_errors: list = dataclasses.field(default_factory=list)  # a second run not refused

  def table(self) -> str:
    faults_line = ", ".join(f"{self.injected[k]} {k}" for k in KINDS)
    rows = [
        ("rounds", self.rounds),
        (f"faults injected ({faults_line})", sum(self.injected.values())),
        ("rounds ending with final parameters equal to the reference, bit for bit", self.equal),
        ("rounds whose last run refused with one line", len(self.refused)),
        ("damaged checkpoints detected", f"{self.damage_detected} of {self.injected['corrupt']}"),
        ("(damage redrawn because it hit only bytes no read touches)", self.damage_inert),
        (
            "racing second runs refused with one line",
            f"{self.races_refused} of " f"{self.injected['race']}",
        ),
        ("silent divergences", self.diverged + self.damage_missed + len(self.race_errors)),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


class Pipeline:
  """Starts the tiny pipeline on workdirs under `root`, with a shared compilation cache."""

  def __init__(self, root: str, overrides=()):
    self.root = root
    # The data and tokenizer, prepared once by the reference run and only read by the others.
    data = f"--config.data.dir={os.path.join(root, 'data')}"
    self.overrides = OVERRIDES + (data,) + tuple(overrides)
    self.env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    self.logs = 0

  def start(self, workdir: str) -> subprocess.Popen:
    """The pipeline on `workdir`, its output going to the file `.log` names."""
    self.logs += 1
    log = os.path.join(self.root, f"run{self.logs:03d}.log")
    with open(log, "w") as f:
      proc = subprocess.Popen(
          tiny_run.command(workdir, *self.overrides),
          cwd=ROOT,
          env=self.env,
          stdout=f,
          stderr=subprocess.STDOUT,
      )
    proc.log = log
    return proc

  def run(self, workdir: str) -> tuple[int, str]:
    """(exit status, output) of the pipeline on `workdir`."""
    proc = self.start(workdir)
    return proc.wait(timeout=900), _read(proc.log)


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _last_line(output: str) -> str:
  lines = [l for l in output.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def read_step(step_dir: str, item: str = STATE) -> dict:
  """{path: array} of one item of a checkpoint step, read as Orbax wrote it, unverified."""
  import jax
  import orbax.checkpoint as ocp

  path = os.path.join(step_dir, item)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def final_parameters(workdir: str) -> dict:
  """{stage: {path: array}} of the newest checkpoint of every trained stage that has one."""
  out = {}
  for stage in TRAINED:
    directory = os.path.join(workdir, stage, "checkpoints")
    steps = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [int(d) for d in steps if d.isdigit()]
    if steps:
      out[stage] = read_step(os.path.join(directory, str(max(steps))))
  return out


def equal(a: dict, b: dict) -> bool:
  """Whether two {name: {path: array}} hold the same arrays, bit for bit."""
  return (
      bool(a)
      and a.keys() == b.keys()
      and all(
          a[s].keys() == b[s].keys() and all(np.array_equal(a[s][k], b[s][k]) for k in a[s])
          for s in a
      )
  )


def _damage(step_dir: str, rng: random.Random) -> int:
  """Damages `step_dir` in place (`faults.damage_in_place`) so that what it reads back as
  changes (or no longer decodes); returns how many tries hit only bytes no read touches (OCDBT's
  data files keep superseded tree nodes), each undone before the next."""
  before = {item: read_step(step_dir, item) for item in (STATE, DIGEST)}
  originals = {}
  for path in faults.data_files(step_dir):
    with open(path, "rb") as f:
      originals[path] = f.read()
  inert = 0
  while True:
    path, _ = faults.damage_in_place(step_dir, rng)
    try:
      after = {item: read_step(step_dir, item) for item in (STATE, DIGEST)}
    except Exception:  # TensorStore's decode errors have no common type
      return inert
    if not equal(after, before):
      return inert
    inert += 1
    with open(path, "r+b") as f:
      f.write(originals[path])


def _wait(proc, seconds: float) -> bool:
  """Waits up to `seconds` for `proc` to end; True if it still runs."""
  try:
    proc.wait(timeout=seconds)
    return False
  except subprocess.TimeoutExpired:
    return True


def _newest_unfinished_checkpoint(workdir: str) -> str | None:
  """The newest checkpoint step of a stage without DONE.json: the one its next run restores."""
  steps = []
  for stage in TRAINED:
    if os.path.exists(os.path.join(workdir, stage, "DONE.json")):
      continue
    directory = os.path.join(workdir, stage, "checkpoints")
    if os.path.isdir(directory):
      steps += [os.path.join(directory, d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps, key=lambda s: int(os.path.basename(s))) if steps else None


def _damage_detected(rc: int, output: str, step_dir: str) -> bool:
  """Whether a run after the damage of `step_dir` set it aside with a warning, or refused."""
  warned = f"the checkpoint {step_dir} does not restore" in output
  refused = rc == 2 and step_dir.rsplit("/", 2)[0] in _last_line(output)
  return warned or refused


def run_round(pipe: Pipeline, rng, workdir: str, plan, duration: float, tally: Tally):
  """The faults of `plan` on one fresh workdir, each signal at a random moment of a run (a
  run's `duration` in seconds is the scale), then a last run left alone; returns its (rc,
  output)."""
  damaged = None  # a checkpoint damaged since the last run, which the next run must detect
  for kind in plan:
    if kind == "corrupt":
      if damaged:
        continue
      step_dir = _newest_unfinished_checkpoint(workdir) or _kill_at_a_checkpoint(
          pipe, workdir, rng.choice((1, 2))
      )
      if step_dir is None:
        continue  # every stage finished: nothing left that a run would restore
      tally.damage_inert += _damage(step_dir, rng)
      tally.injected[kind] += 1
      damaged = step_dir
      continue
    proc = pipe.start(workdir)
    if kind == "race":
      rc, output = _race(pipe, workdir, proc, rng.uniform(0.0, 0.25 * duration), tally)
    else:
      if _wait(proc, rng.uniform(1.0, 0.8 * duration)):  # else it finished first: no fault
        proc.send_signal(_SIGNALS[kind])
        proc.wait(timeout=900)
        tally.injected[kind] += 1
      rc, output = proc.returncode, _read(proc.log)
    if damaged and _count_damage(tally, rc, output, damaged):
      damaged = None
  rc, output = pipe.run(workdir)
  if damaged:
    _count_damage(tally, rc, output, damaged)
  return rc, output


def _kill_at_a_checkpoint(pipe: Pipeline, workdir: str, count: int) -> str | None:
  """Starts a run and kills it (SIGKILL) once the stage in progress has saved `count`
  checkpoints; returns the newest checkpoint of a stage in progress then (None if the run ended
  first, with every stage finished)."""
  proc = pipe.start(workdir)
  saved = set()
  while proc.poll() is None and len(saved) < count:
    step_dir = _newest_unfinished_checkpoint(workdir)
    if step_dir is not None:
      stage = os.path.dirname(step_dir)
      saved = {s for s in saved if os.path.dirname(s) == stage} | {step_dir}
    time.sleep(0.05)
  proc.kill()
  proc.wait(timeout=900)
  return _newest_unfinished_checkpoint(workdir)


def _race(pipe: Pipeline, workdir: str, first: subprocess.Popen, delay: float, tally: Tally):
  """A second run on the workdir of `first`, `delay` seconds after it started: exactly one of
  them must be refused, whichever takes the lock first. Returns the (rc, output) of the other
  (of `first` if neither was refused)."""
  _wait(first, delay)
  rc, output = pipe.run(workdir)
  overlapped = first.poll() is None  # `first` ran from before the second started to its end
  first.wait(timeout=900)
  outputs = [(rc, output), (first.returncode, _read(first.log))]
  refused = [o for r, o in outputs if r == 2 and "is in use by another run" in _last_line(o)]
  if len(refused) == 1:
    tally.injected["race"] += 1
    tally.races_refused += 1
  elif overlapped or refused:
    tally.injected["race"] += 1
    tally.race_errors.append(" / ".join(f"rc={r}: {_last_line(o)}" for r, o in outputs))
  # Otherwise `first` may have ended before the second started: no race took place.
  return next(((r, o) for r, o in outputs[::-1] if o not in refused), outputs[1])


def _count_damage(tally: Tally, rc: int, output: str, step_dir: str) -> bool:
  """Counts a damaged checkpoint as detected or missed by the run that read it; False if that
  run stopped before reading it (a signal), so the next run must."""
  if _damage_detected(rc, output, step_dir):
    tally.damage_detected += 1
  elif rc == 0:
    tally.damage_missed += 1
  else:
    return False
  return True


def run(root: str, rounds: int, seed: int, overrides=(), plans=None) -> Tally:
  """`rounds` rounds of 1 to 3 faults drawn with `seed` (or the kinds of `plans[r]`), with runs
  and logs under `root`; prints a line per round and the table."""
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # Orbax logs every item it reads
  os.makedirs(root, exist_ok=True)
  pipe = Pipeline(root, overrides)
  t0 = time.time()
  reference = {}
  # Twice: the second run, compiled from the cache as the later ones are, times a run; and the
  # comparison means something only if two undisturbed runs agree.
  for name in ("reference", "reference_again"):
    start = time.time()
    rc, output = pipe.run(os.path.join(root, name))
    if rc:
      raise RuntimeError(f"the {name} run failed (exit {rc}):\n{output[-3000:]}")
    duration = time.time() - start
    reference[name] = final_parameters(os.path.join(root, name))
  if not equal(reference["reference_again"], reference["reference"]):
    raise RuntimeError("two undisturbed runs ended with different parameters")
  tally = Tally()
  for r in range(rounds):
    rng = random.Random(seed * 1_000_003 + r)
    plan = plans[r] if plans else [rng.choice(KINDS) for _ in range(rng.randint(1, 3))]
    workdir = os.path.join(root, f"round{r}")
    shutil.rmtree(workdir, ignore_errors=True)
    before = sum(tally.injected.values())
    rc, output = run_round(pipe, rng, workdir, plan, duration, tally)
    tally.rounds += 1
    if rc:
      tally.refused.append(_last_line(output))
      outcome = f"refused: {_last_line(output)}"
    elif equal(final_parameters(workdir), reference["reference"]):
      tally.equal += 1
      outcome = "final parameters equal to the reference"
    else:
      tally.diverged += 1
      outcome = "SILENT DIVERGENCE"
    injected = sum(tally.injected.values()) - before
    print(f"round {r}: plan {','.join(plan)}, {injected} injected; {outcome}", flush=True)
  print(f"\n{tally.table()}\n\n({time.time() - t0:.0f} s; runs and logs in {root})", flush=True)
  return tally


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python tests/fault_injection.py", description=__doc__)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="", help="where the runs go (default: a temp dir)")
  parser.add_argument("--override", action="append", default=[], help="a --config.* flag")
  args = parser.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="fault_injection_")
  tally = run(root, args.rounds, args.seed, args.override)
  if tally.diverged or tally.damage_missed or tally.race_errors:
    sys.exit(1)


if __name__ == "__main__":
  main()
