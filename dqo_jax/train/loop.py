"""The one place that jits a train step: shardings, donation, checkpoints, resume, logging.

`fit` runs a pure step `(state, batch) -> (state, metrics)` for `num_steps` steps. The batch for
step i is a deterministic function of i and the steps draw no random numbers, so the state and
the step number are all a resumed run needs to continue exactly as an uninterrupted one (a step
that needs randomness must derive it from the state, e.g. `fold_in(key, state.step)`).
Checkpoints are saved asynchronously every `checkpoint.every` steps; SIGINT, SIGTERM and a JAX
preemption notice finish the current step, save it, and stop with a message saying how to
resume; kill -9 loses at most `checkpoint.every` steps. A step whose loss or gradient is not
finite is skipped inside the step (`keep_if_finite`); after `max_nonfinite` skips in a row the
run saves its state, which the skips left at the last good update, and stops (NonFiniteStop),
as does a run whose final metrics are not finite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Callable

import jax
from flax.linen import meta

from dqo_jax import sharding
from dqo_jax.checkpoint import Checkpoints
from dqo_jax.errors import UserError
from dqo_jax.metrics import ScalarWriter, mean_metrics, write_json_atomic
from dqo_jax.progress import tqdm


class Interrupted(Exception):
  """Training stopped by a signal after saving; rerunning the same command resumes."""


class NonFiniteStop(UserError):
  """Training stopped by the non-finite guard, or finished with non-finite final metrics, after
  saving its last good state at `step`; `reason` says what happened in a few words."""

  def __init__(self, message: str, *, step: int, reason: str):
    super().__init__(message)
    self.step, self.reason = step, reason


@contextlib.contextmanager
def _stop_requests():
  """Signals received while training, recorded for the loop to save and stop between steps.

  Only in a single process: with several, a host that stopped alone would leave the others
  waiting in the save's barrier, and SIGTERM is the JAX preemption service's notice, whose own
  handler must stay so that all hosts agree on a step to save at (`reached_preemption`).
  """
  received = []
  handler = lambda signum, frame: received.append(signum)
  signals = (signal.SIGINT, signal.SIGTERM) if jax.process_count() == 1 else ()
  previous = {s: signal.signal(s, handler) for s in signals}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def abstract_state(init_fn: Callable, mesh, rules, init_args=()):
  """Shapes, dtypes and shardings of the state `init_fn(rng, *init_args)` builds.

  `init_fn` returns parameters boxed with logical axis names (`nn.LogicallyPartitioned`).
  """
  boxed = jax.eval_shape(init_fn, jax.random.key(0), *init_args)
  shardings = sharding.state_shardings(boxed, mesh, rules)
  shapes = meta.unbox(boxed)
  return (
      jax.tree.map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
      ),
      shardings,
  )


def init_state(init_fn: Callable, rng, shardings, init_args=()):
  # Arguments, not closures: a closed-over checkpoint would be baked into the program.
  return jax.jit(lambda r, *a: meta.unbox(init_fn(r, *a)), out_shardings=shardings)(rng, *init_args)


def jit_step(step_fn: Callable, state_shardings, mesh, rules, base_shardings=None):
  """The step jitted over the mesh: state sharded by its logical axes and donated, batch split
  over the data axes, activations placed by `rules`, metrics replicated. With `base_shardings`
  (LoRA) the step takes the frozen base as a third argument, read and never donated."""

  def constrained_step(state, batch, *base):
    with sharding.activation_constraints(mesh, rules):
      return step_fn(state, batch, *base)

  base = () if base_shardings is None else (base_shardings,)
  return jax.jit(
      constrained_step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), *base),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )


# {step: updates skipped as non-finite in steps 1..step} for the saved steps, so that a resumed
# run counts the skips of the runs before it.
SKIPPED_FILE = "skipped_updates.json"


def _read_skipped(path: str) -> dict[str, int]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def fit(
    *,
    stage_dir: str,
    init_fn: Callable,
    step_fn: Callable,
    batch_at: Callable[[int], dict],
    num_steps: int,
    mesh,
    rules,
    rng,
    checkpoint_cfg,
    max_nonfinite: int,
    log_every: int,
    desc: str,
    init_args=(),
    on_log: Callable[[int, dict], dict] | None = None,
    checkpoint_dir: str | None = None,
    on_save: Callable[[], object] | None = None,
    base=None,
    base_shardings=None,
):
  """Trains and returns (state, summary). Resumes from the checkpoints in `checkpoint_dir`
  (default `<stage_dir>/checkpoints`; a gs:// URL works too) if there are any.

  A fresh state is `init_fn(rng, *init_args)`; with LoRA, `base` (the frozen parameters, laid
  out by `base_shardings`) is the step's third argument and is not checkpointed, so that a
  checkpoint holds the adapters alone. `on_log(step, state)` may add metrics, and
  `on_save()` runs after each checkpoint save. The step's metrics include `skipped_updates`
  (1.0 when its update was skipped as non-finite); the summary's counts every step from 0, those
  of the runs this one resumed included (`<stage_dir>/skipped_updates.json`).
  With several processes each feeds only its devices' rows of `batch_at(step)` (the global
  batch), and only process 0 writes summaries.
  """
  abstract, shardings = abstract_state(init_fn, mesh, rules, init_args)
  ckpt = Checkpoints(
      checkpoint_dir or os.path.join(stage_dir, "checkpoints"),
      every=checkpoint_cfg.every,
      keep=checkpoint_cfg.keep,
  )
  start, state = ckpt.restore_latest(abstract, warn=lambda line: tqdm.write(f"[{desc}] {line}"))
  if start:
    tqdm.write(f"[{desc}] resuming from the checkpoint at step {start}")
  else:
    state = init_state(init_fn, rng, shardings, init_args)
  put = lambda i: sharding.put_batch(batch_at(i), mesh)
  step_jit = jit_step(step_fn, shardings, mesh, rules, base_shardings)
  frozen = () if base is None else (base,)
  writer = ScalarWriter(stage_dir)
  history, last = [], {}
  skipped_file = os.path.join(stage_dir, SKIPPED_FILE)
  skipped_at = _read_skipped(skipped_file) if start else {}
  skipped, streak = skipped_at.get(str(start), 0), 0
  t0 = time.time()
  try:
    if num_steps == 0 and not start:
      # No step still leaves a checkpoint, the initial state, for the stages that read this
      # one's (`sft.steps=0`: the pretrained model, or an imported adapter, as it is).
      ckpt.save(0, state, force=True)
    with _stop_requests() as stop, tqdm(
        total=num_steps,
        initial=start,
        desc=desc,
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    ) as bar:
      batch = put(start) if start < num_steps else None
      for step in range(start, num_steps):
        state, metrics = step_jit(state, batch, *frozen)
        if step + 1 < num_steps:
          batch = put(step + 1)  # prepared while the device runs this step
        # The one read of every step: deciding to stop needs it now, not at the next log.
        was_skipped = bool(metrics["skipped_updates"])
        skipped += was_skipped
        streak = streak + 1 if was_skipped else 0
        history.append(metrics)
        bar.update(1)
        done = step + 1
        if done % log_every == 0 or done == num_steps:
          last = mean_metrics(history)
          history = []
          if on_log is not None:
            last.update(on_log(done, state))
          writer.write(done, last)
          bar.set_postfix({k: f"{v:.3g}" for k, v in list(last.items())[:3]})
        preempted = ckpt.reached_preemption(done)
        diverged = streak >= max_nonfinite
        # One save call per step: a second one for the same step would be refused by Orbax.
        saved = ckpt.save(
            done, state, force=done == num_steps or bool(stop) or preempted or diverged
        )
        if saved:
          skipped_at[str(done)] = skipped
          write_json_atomic(skipped_file, skipped_at)
        if saved and on_save is not None:
          on_save()
        if diverged:
          reason = (
              f"steps {done - streak + 1}-{done} of {num_steps} all had a non-finite loss or "
              f"gradient and were skipped"
          )
          raise NonFiniteStop(
              f"[{desc}] {reason}; the last good state is saved in {ckpt.step_dir(done)}; "
              "lower the learning rate or check the data",
              step=done,
              reason=reason,
          )
        if stop or preempted:
          cause = f"signal {stop[0]}" if stop else "a preemption notice"
          raise Interrupted(
              f"[{desc}] stopped by {cause} at step {done}/{num_steps}; "
              f"checkpoint saved in {ckpt.directory}; rerun the same command to resume"
          )
  finally:
    writer.close()
    ckpt.close()
  nonfinite = [k for k, v in last.items() if not math.isfinite(v)]
  if nonfinite:
    names = ", ".join(nonfinite[:3]) + (f" and {len(nonfinite) - 3} more" if nonfinite[3:] else "")
    reason = (
        f"{skipped} of {num_steps} updates were skipped as non-finite and the final "
        f"metrics are not finite ({names})"
    )
    raise NonFiniteStop(
        f"[{desc}] {reason}; the state saved at step {num_steps} leaves the skipped updates "
        "out; check the data or lower the learning rate",
        step=num_steps,
        reason=reason,
    )
  summary = dict(
      steps=num_steps,
      resumed_from=start,
      skipped_updates=skipped,
      seconds=round(time.time() - t0, 1),
      final_metrics=last,
  )
  return state, summary
