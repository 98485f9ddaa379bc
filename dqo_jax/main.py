"""The pipeline: `python -m dqo_jax.main --config=configs/arith.py --workdir=DIR`.

Runs the stages named in `config.stages` in order (sft, sample, rollouts, train, eval). Each
writes under its own directory (DIR/<stage>/; DIR/<run name>/ and DIR/eval/<run name>/ for the
method in `config.method`) and ends by writing DONE.json there; a stage with that file is
skipped (`--redo=STAGE` runs it again, dqo_jax/stages/redo.py), and a training stage that was
interrupted resumes from its last checkpoint. Config values are overridden on the command line,
e.g. `--config.method=dpo --config.dqo.beta=0.05`.

DIR may be a gs://BUCKET/PATH URL: checkpoints are written there by Orbax, the other files
through a local cache that is copied up after every stage and checkpoint (dqo_jax/workdir.py;
`--cache_dir`).

Multi-host: run the same command on every host, adding `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (I = 0..N-1); on a TPU pod slice the TPU environment supplies
them (`--distributed=auto`, the default). DIR must be the same for every host: a gs:// URL, or
a directory they share (e.g. a bucket mounted with gcsfuse).

`--compile_only --topology=v5p-16` instead compiles the run's jitted programs (SFT and train
steps, sampler, reference log-probs, evaluation) for that TPU slice and prints their per-chip
memory (dqo_jax/aot.py, docs/scaling.md).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from dqo_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory or gs://BUCKET/PATH URL for every output of the run."
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", "", "With a gs:// workdir: the local copy's root (default ~/.cache/dqo_jax)."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "off"], "auto: multi-process from the flags below or a TPU pod"
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes (hosts) in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only",
    False,
    "Compile the DQO/DRO train step for --topology and print its per-chip memory and FLOPs; "
    "runs nothing and needs no workdir, weights or TPU (dqo_jax/aot.py).",
)
_REDO = flags.DEFINE_list(
    "redo",
    [],
    "Stages to run again although finished, e.g. --redo=sample: their outputs in the workdir and "
    "those of the stages that depend on them are removed first (dqo_jax/stages/redo.py).",
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: the TPU slice, e.g. v5p-16, v4-8, v5e-16, v6e-8."
)


def check_config(config) -> list[str]:
  from dqo_jax import config_keys, lora, methods
  from dqo_jax.model import REMAT_POLICIES, unknown_config_keys
  from dqo_jax.stages.context import STAGES
  from dqo_jax.train import accumulate
  from dqo_jax.train.state import check_optimizer

  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise UserError(f"config.stages names unknown stage(s) {unknown}; choose from {list(STAGES)}")
  method = methods.of(config)
  for key in _batch_sizes(config):
    size = _lookup(config, key)
    if not isinstance(size, int) or size < 1:
      raise UserError(f"config.{key}={size} must be a positive number of rows")
  for section in ("sft", "train"):
    accumulate.check_steps(
        config[section].batch_size,
        config[section].grad_accum_steps,
        f"config.{section}.grad_accum_steps",
    )
  unknown = config_keys.unknown_keys(config)
  if unknown:
    raise UserError(
        f"config has no setting {', '.join(unknown)} (configs/{config.data.task}.py lists them)"
    )
  unknown = unknown_config_keys(config.model)
  if unknown:
    raise UserError(f"config.model has no setting {', '.join(unknown)}")
  lora.check(config)
  remat = config.model.get("remat", "none")
  if remat not in REMAT_POLICIES:
    raise UserError(f"config.model.remat={remat!r}; choose from {', '.join(REMAT_POLICIES)}")
  chunk = config.model.get("logprob_chunk", 0)
  if not isinstance(chunk, int) or chunk < 0:
    raise UserError(
        f"config.model.logprob_chunk={chunk!r} must be a number of positions (0: whole logits)"
    )
  for section in ("sft", "train"):
    buckets = config[section].length_buckets
    if not isinstance(buckets, int) or buckets < 1:
      raise UserError(f"config.{section}.length_buckets={buckets!r} must be 1 (off) or more")
  method.check(config)
  _check_rounds(config, method)
  for key in ("sft.optimizer", "train.policy_optimizer", "train.value_optimizer"):
    check_optimizer(_lookup(config, key), key)
  for section in ("sft", "train"):
    if config[section].max_consecutive_nonfinite < 1:
      raise UserError(f"config.{section}.max_consecutive_nonfinite must be at least 1")
  if config.eval.every % config.log_every:
    raise UserError(
        f"config.eval.every={config.eval.every} must be a multiple of "
        f"config.log_every={config.log_every}"
    )
  return stages


def _check_rounds(config, method) -> None:
  from dqo_jax import lora

  rounds, reference = config.train.get("rounds", 1), config.train.get("round_reference", "sft")
  if not isinstance(rounds, int) or rounds < 1:
    raise UserError(f"config.train.rounds={rounds!r} must be 1 (one round) or more")
  if reference not in ("sft", "previous"):
    raise UserError(f"config.train.round_reference={reference!r}; choose from sft, previous")
  if rounds == 1:
    return
  why = None
  if not method.reads_samples:
    why = f"{config.method} trains on the gold solutions, not on samples"
  elif method.needs_rollouts(config):
    why = "process supervision's rollouts are of the SFT policy's samples only"
  elif lora.enabled(config, "train"):
    why = "LoRA runs train adapters over the SFT policy, not over an earlier round's"
  if why:
    raise UserError(f"config.train.rounds={rounds} is not supported here ({why}); set it to 1")


def _batch_sizes(config) -> list[str]:
  """The config keys of every batch the stages put on the devices."""
  keys = ["sft.batch_size", "train.batch_size", "sample.batch_size", "eval.batch_size"]
  from dqo_jax import methods

  return keys + (["dqo.process.batch_size"] if methods.of(config).needs_rollouts(config) else [])


def _lookup(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def check_batches(config, data_parallel: int) -> None:
  """UserError unless every batch (each micro-batch with gradient accumulation) splits evenly
  over the `data_parallel` devices of the mesh's data and fsdp axes."""
  from dqo_jax import methods

  for key in _batch_sizes(config):
    section = key.split(".")[0]
    size = _lookup(config, key)
    accum = config[section].grad_accum_steps if section in ("sft", "train") else 1
    # Pairwise methods (DPO, KTO) put two rows per example on the devices.
    rows_per_example = methods.of(config).rows_per_example if key == "train.batch_size" else 1
    need = data_parallel * accum // math.gcd(rows_per_example, data_parallel * accum)
    if size % need:
      parts = f" in {accum} micro-batches" if accum > 1 else ""
      raise UserError(
          f"config.{key}={size} does not split evenly over the {data_parallel} data-parallel "
          f"devices (config.mesh data x fsdp){parts}; use a multiple of {need}"
      )


def describe(summary: dict, prefix: str = "") -> str:
  """A stage summary as one readable line: nested keys joined by '.', floats to 3 digits."""
  parts = []
  for key, value in summary.items():
    if isinstance(value, dict):
      parts.append(describe(value, f"{prefix}{key}."))
    elif isinstance(value, float):
      parts.append(f"{prefix}{key}={value:.3g}")
    else:
      parts.append(f"{prefix}{key}={value}")
  return ", ".join(p for p in parts if p)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """'key: old -> new' for every leaf that differs between two config dicts."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_changes(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a} -> {b}")
  return out


def run_pipeline(config, workdir: str, cache_dir: str = "", redo_stages=()) -> dict:
  """Runs the stages of `config` in `workdir`; `redo_stages` (--redo) are run again although
  finished, after their outputs and those of the stages that read them are removed."""
  import jax

  from dqo_jax import sharding, workdir_lock
  from dqo_jax.stages import evaluate, redo, rollouts, sample, sft, train
  from dqo_jax.workdir import open_workdir

  runners = {
      "sft": sft.run,
      "sample": sample.run,
      "rollouts": rollouts.run,
      "train": train.run,
      "eval": evaluate.run,
  }

  stages = check_config(config)
  if config.model.get("attention") == "pallas_tpu" and jax.default_backend() != "tpu":
    raise UserError(
        f"config.model.attention='pallas_tpu' runs only on TPU (here: {jax.default_backend()}); "
        "use xla (--compile_only compiles it for a TPU slice from any machine)"
    )
  mesh = sharding.make_mesh(config.mesh)
  check_batches(config, sharding.batch_rows(mesh))
  redo.check(list(redo_stages), stages)
  wd = open_workdir(workdir, cache_dir)
  with workdir_lock.held(wd):  # before anything is written there
    try:
      return _run_stages(config, stages, wd, runners, redo_stages)
    finally:
      wd.push()  # whatever a failed or interrupted run wrote is kept too


def _run_stages(config, stages, wd, runners, redo_stages=()) -> dict:
  from dqo_jax import distributed, methods
  from dqo_jax.metrics import write_json_atomic
  from dqo_jax.stages import evaluate, redo
  from dqo_jax.stages.context import build_context, stage_output
  from dqo_jax.train.loop import NonFiniteStop

  if wd.pull():
    print(f"[setup] copied the files of {wd.url} to {wd.path}")
  if redo_stages:
    removed = redo.redo(config, wd, list(redo_stages))
    print(f"[redo] removed the outputs of {', '.join(removed) or 'nothing (none were there)'}")
  workdir = wd.path
  config_file = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(config_file):
    with open(config_file) as f:
      # Switching the method is how one workdir hosts several; it leaves finished stages alone.
      changed = [c for c in config_changes(json.load(f), current) if not c.startswith("method:")]
    if changed:
      # Finished stages are skipped whatever the config says: make that visible.
      print(
          f"[setup] warning: config differs from this workdir's last run ({', '.join(changed)}); "
          "finished stages keep their old results; rerun them with --redo=STAGE or use a new "
          "--workdir"
      )
  # Process 0 prepares the data (and trains the tokenizer) before the others read them.
  if not distributed.is_writer():
    distributed.barrier("data")
    wd.pull()
  ctx = build_context(config, wd)
  if distributed.is_writer():
    wd.push()
    distributed.barrier("data")
  where = f"{wd.url} (local copy {workdir})" if wd.url else workdir
  print(
      f"[setup] {len(ctx.train)} train / {len(ctx.validation or [])} validation / "
      f"{len(ctx.test)} test problems, "
      f"vocabulary {ctx.tokenizer.vocab_size}, devices {ctx.mesh.devices.size} "
      f"(mesh {dict(ctx.mesh.shape)}), workdir {where}"
  )
  timings = {}
  started = False
  needs_rollouts = methods.of(config).needs_rollouts(config)
  for stage in stages:
    label = stage_output(config, stage)
    if stage == "rollouts" and not needs_rollouts:
      print(f"[{label}] not needed by run {methods.run_name(config)}; skipped")
      continue
    done_file = os.path.join(workdir, label, "DONE.json")
    if os.path.exists(done_file):
      print(f"[{label}] already complete ({done_file}); skipped")
      continue
    stopped_file = os.path.join(label, STOPPED_FILE)
    _check_stopped(config, stage, label, os.path.join(workdir, stopped_file), current)
    if not started:
      # The settings of the stages that run from here: written only now, so that a run that
      # failed its checks or ran nothing leaves the workdir's record as it was.
      write_json_atomic(config_file, current)
      started = True
    if os.path.exists(os.path.join(workdir, stopped_file)):
      redo.remove(wd, stopped_file)  # the settings changed: _check_stopped let it resume
    t0 = time.time()
    try:
      summary = runners[stage](ctx)
    except NonFiniteStop as e:
      write_json_atomic(
          os.path.join(workdir, stopped_file), dict(step=e.step, reason=e.reason, config=current)
      )
      raise UserError(
          f"{e}; rerunning with the same settings stops again, --redo={stage} starts the "
          "stage over"
      ) from None
    timings[stage] = round(time.time() - t0, 1)
    write_json_atomic(done_file, dict(summary=summary, seconds=timings[stage]))
    wd.push()
    distributed.barrier(f"{label} done")  # the next stage reads what process 0 wrote
    if not distributed.is_writer():
      wd.pull()
    print(f"[{label}] done in {timings[stage]:.0f}s: {describe(summary)}")
  results_file = os.path.join(workdir, "results.json")
  if os.path.exists(results_file):
    with open(results_file) as f:
      results = json.load(f)
    shown, title = results, "Accuracy on the test split (val greedy: the validation split; obj"
    if not config.eval.test:  # choosing settings: the table shows validation, test was not read
      title = "Accuracy on the validation split (eval.test=False; obj"
      shown = {n: dict(r["validation"], objective=r["objective"]) for n, r in results.items()}
    print(
        f"\n{title}: E[R] - beta KL of fresh samples on training and held-out prompts)\n"
        + evaluate.format_table(shown)
    )
    return results
  return {}


# Written in a training stage's directory when the non-finite guard stopped it.
STOPPED_FILE = "STOPPED.json"


def _check_stopped(config, stage: str, label: str, stopped_file: str, current: dict) -> None:
  """UserError if an earlier run of `stage` was stopped by the non-finite guard and rerunning it
  would repeat that: the same settings (config.stages aside), or no step left to train."""
  if not os.path.exists(stopped_file):
    return
  with open(stopped_file) as f:
    stopped = json.load(f)
  changed = [c for c in config_changes(stopped["config"], current) if not c.startswith("stages:")]
  steps = config["sft" if stage == "sft" else "train"].steps
  if changed and stopped["step"] < steps:
    print(
        f"[{label}] resuming from step {stopped['step']}, where the non-finite guard stopped an "
        f"earlier run, with changed settings ({', '.join(changed)})"
    )
    return
  why = "with the same settings" if not changed else f"at step {stopped['step']} of {steps}"
  raise UserError(
      f"[{label}] an earlier run stopped: {stopped['reason']}; resuming {why} would stop again or "
      f"train nothing: check the data or lower the learning rate, then start the stage over "
      f"with --redo={stage}"
  )


def command_line(argv):
  """(config, workdir) from the flags shared by the commands (this one and dqo_jax.compare)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Orbax and TFDS log every file they touch at INFO; the progress bars say what matters.
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("both --config=FILE and --workdir=DIR are required")
  return _CONFIG.value, _WORKDIR.value


def compile_only(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError("--compile_only needs --config=FILE and --topology=SLICE (e.g. v5p-16)")
  # The host only traces the step; libtpu compiles it for the slice without any TPU attached.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from dqo_jax import aot

  check_config(_CONFIG.value)
  aot.run(_CONFIG.value, _TOPOLOGY.value)


def main(argv):
  if _COMPILE_ONLY.value:
    try:
      compile_only(argv)
    except (UserError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  from dqo_jax import distributed
  from dqo_jax.train.loop import Interrupted

  config, workdir = command_line(argv)
  try:
    distributed.initialize(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    run_pipeline(config, workdir, _CACHE_DIR.value, _REDO.value)
  except Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(130)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    full = _no_space_left(e)
    if full is None:
      raise
    where = f" writing {full.filename}" if full.filename else f" in --workdir={workdir}"
    print(
        f"error: no space left on the device{where}; free space there or pass a --workdir "
        "(and --cache_dir) on a larger disk, then rerun the same command to resume",
        file=sys.stderr,
    )
    sys.exit(2)


def _no_space_left(error: BaseException) -> OSError | None:
  """The OSError ENOSPC behind `error` (itself, or what it was raised from: Orbax and TensorStore
  wrap I/O errors in their own types, some keeping only the text), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error
    if "No space left on device" in str(error):
      return OSError(errno.ENOSPC, "No space left on device")
    error = error.__cause__ or error.__context__
  return None


def _one_line(e: BaseException) -> str:
  """ml_collections nests reprs, tracebacks and newlines in its messages: keep the gist."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if "Traceback" in text:  # an exception raised inside the config file: its last line says why
    lines = lines[-1:]
  msg = " ".join(" ".join(lines).split())
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
    msg = msg[1:-1]
  if isinstance(e, (AttributeError, KeyError)):
    msg = f"unknown config key {msg.replace(chr(39), '')}"
  return msg


def parse_flags(argv):
  """absl's parser, with a bad config file or override reported as one line."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load raises on first use
    return argv
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f"error: {_one_line(e)} (check --config and its --config.* overrides)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
