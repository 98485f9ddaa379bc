"""The one place that jits a train step: shardings, donation, checkpoints, resume, logging.

`fit` runs a pure step `(state, batch) -> (state, metrics)` for `num_steps` steps. The batch for
step i is a deterministic function of i, so a run resumed from the checkpoint at step i sees
exactly the batches it would have seen. SIGINT and SIGTERM finish the current step, save, and
stop with a message saying how to resume; kill -9 loses at most `checkpoint.every` steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Callable

import jax
from flax.linen import meta
from tqdm import tqdm

from dqo_jax import sharding
from dqo_jax.checkpoint import Checkpoints
from dqo_jax.metrics import ScalarWriter, mean_metrics


class Interrupted(Exception):
  """Training stopped by a signal after saving; rerunning the same command resumes."""


@contextlib.contextmanager
def _stop_requests():
  received = []
  handler = lambda signum, frame: received.append(signum)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
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


def jit_step(step_fn: Callable, state_shardings, mesh, rules):
  """The step jitted over the mesh: state sharded by its logical axes and donated, batch split
  over the data axes, activations placed by `rules`, metrics replicated."""

  def constrained_step(state, batch):
    with sharding.activation_constraints(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(
      constrained_step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )


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
    log_every: int,
    desc: str,
    init_args=(),
    on_log: Callable[[int, dict], dict] | None = None,
):
  """Trains and returns (state, summary). Resumes from `<stage_dir>/checkpoints` if present.

  A fresh state is `init_fn(rng, *init_args)`; `on_log(step, state)` may add metrics.
  With several processes each feeds only its devices' rows of `batch_at(step)` (the global
  batch), and only process 0 writes summaries.
  """
  abstract, shardings = abstract_state(init_fn, mesh, rules, init_args)
  ckpt = Checkpoints(
      os.path.join(stage_dir, "checkpoints"), every=checkpoint_cfg.every, keep=checkpoint_cfg.keep
  )
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(abstract)
    tqdm.write(f"[{desc}] resuming from the checkpoint at step {start}")
  else:
    state = init_state(init_fn, rng, shardings, init_args)
  step_jit = jit_step(step_fn, shardings, mesh, rules)
  writer = ScalarWriter(stage_dir)
  history, last = [], {}
  t0 = time.time()
  try:
    with _stop_requests() as stop, tqdm(
        total=num_steps,
        initial=start,
        desc=desc,
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    ) as bar:
      for step in range(start, num_steps):
        batch = sharding.put_batch(batch_at(step), mesh)
        state, metrics = step_jit(state, batch)
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
        # One save call per step: a second one for the same step would be refused by Orbax.
        ckpt.save(done, state, force=done == num_steps or bool(stop))
        if stop:
          raise Interrupted(
              f"[{desc}] stopped by signal {stop[0]} at step {done}/{num_steps}; "
              f"checkpoint saved in {ckpt.directory}; rerun the same command to resume"
          )
  finally:
    writer.close()
    ckpt.close()
  summary = dict(
      steps=num_steps, resumed_from=start, seconds=round(time.time() - t0, 1), final_metrics=last
  )
  return state, summary
