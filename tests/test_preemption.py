"""Preemption-safe training through `fit`: a run killed with SIGKILL at random steps and restarted
ends bit for bit where an uninterrupted run does; SIGTERM and a preemption notice save the step
they interrupt; a damaged newest checkpoint is set aside for the one before it; a non-finite step
updates nothing, and too many in a row stop the run with its last good state saved.

The interrupted runs are this file run as a script (`python tests/test_preemption.py WORKDIR
STEPS EVERY [lora]`) on a tiny DQO model: policy and value, two optimizers, sharded over two
simulated devices; with `lora`, their adapters over a quantized base (QLoRA) with adapter
dropout. The runs share a compilation cache, so only the first of each kind compiles.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.arith import get_config
from dqo_jax import sharding
from dqo_jax.checkpoint import Checkpoints
from dqo_jax.errors import UserError
from dqo_jax.metrics import read_scalars
from dqo_jax.train.loop import Interrupted, abstract_state, fit
from dqo_jax.methods import dqo
from dqo_jax.model import ModelConfig
from dqo_jax.train import build
from dqo_jax.train.policy_value_step import make_policy_value_step
from dqo_jax.train.state import make_optimizer
from helpers import DQO, OPT, RULES, dqo_setup, random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
ADAPTER_STEPS = 8


def _mesh():
  # Two simulated devices suffice to shard (FSDP) what is saved and restored, at less CPU time.
  return sharding.make_mesh(dict(data=1, fsdp=2, tensor=1), devices=jax.devices()[:2])


def _batch_at(i):
  return random_batch(np.random.default_rng(i))


def _adapter_setup():
  """DQO with rank-4 adapters and dropout over a fixed random NF4 base: (init_fn, step_fn, base,
  base_shardings), as the train stage builds them."""
  config = get_config("tiny")
  config.model.lora.update(rank=4, base_qtype="nf4", base_tile_size=8, dropout=0.1)
  step = build.build_train_step(config, ModelConfig.from_config(config.model, 32), _mesh())
  plain = nn.meta.unbox(build.boxed_init(step.policy_model, jax.random.key(1)))
  base = step.base_of(jax.device_put(plain, step.plain_shardings))
  return lambda rng: step.init_fn(rng, None), step.step_fn, base, step.base_shardings


def _train(
    workdir,
    steps,
    every,
    *,
    init_fn=None,
    step_fn=None,
    batch_at=_batch_at,
    keep=3,
    max_nonfinite=10,
    log_every=5,
    adapters=False,
):
  base = base_shardings = None
  if adapters:
    init_fn, step_fn, base, base_shardings = _adapter_setup()
  elif init_fn is None:
    init_fn, step_fn, _, _ = dqo_setup()
  return fit(
      stage_dir=str(workdir),
      init_fn=init_fn,
      step_fn=step_fn,
      batch_at=batch_at,
      num_steps=steps,
      mesh=_mesh(),
      rules=RULES,
      rng=jax.random.key(0),
      checkpoint_cfg=ml_collections.ConfigDict(dict(every=every, keep=keep)),
      max_nonfinite=max_nonfinite,
      log_every=log_every,
      desc="tiny",
      base=base,
      base_shardings=base_shardings,
  )


def _restore(workdir, step, init_fn=None):
  abstract, _ = abstract_state(init_fn or dqo_setup()[0], _mesh(), RULES)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), every=1)
  try:
    return ckpt.restore(abstract, step)
  finally:
    ckpt.close()


def _equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def _steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return (
      sorted(int(d) for d in os.listdir(directory) if d.isdigit())
      if os.path.isdir(directory)
      else []
  )


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the runs this file starts, so only the first compiles
  (this process's jax read its settings at import and is not affected)."""
  with pytest.MonkeyPatch.context() as env:
    env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    yield


def _start(workdir, steps, every, adapters=False, **popen):
  cmd = [sys.executable, __file__, str(workdir), str(steps), str(every)] + ["lora"] * adapters
  env = dict(os.environ, PYTHONPATH=ROOT)
  with open(f"{workdir}.err", "a") as stderr:  # the child keeps its own copy
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=stderr, text=True, **popen)


def _finish(workdir, steps, every, adapters=False):
  proc = _start(workdir, steps, every, adapters, stdout=subprocess.PIPE)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, _stderr(workdir)
  return out, json.loads(out.strip().splitlines()[-1])


def _stderr(workdir):
  with open(f"{workdir}.err") as f:
    return f.read()[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run's final state."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  _, summary = _finish(workdir, STEPS, 1)
  assert summary["resumed_from"] == 0
  final = _restore(workdir, STEPS)
  before = _restore(workdir, STEPS - 1)
  assert not _equal(final.policy.params, before.policy.params), "the last step changed nothing"
  return workdir, final


def _wait_for_step(workdir, proc, step, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if _steps(workdir) and _steps(workdir)[-1] >= step:
      return
    assert proc.poll() is None, f"the run ended before step {step}: {_stderr(workdir)}"
    time.sleep(0.02)
  raise TimeoutError(f"no checkpoint at step {step} in {workdir}")


def test_run_killed_twice_at_random_steps_ends_exactly_like_an_uninterrupted_one(
    tmp_path, reference
):
  _, final = reference
  workdir = tmp_path / "run"
  rng = random.Random(0)
  reached = 0
  for _ in range(2):
    kill_at = rng.randint(reached + 2, reached + 8)
    proc = _start(workdir, STEPS, 1, stdout=subprocess.DEVNULL)
    _wait_for_step(workdir, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _steps(workdir)[-1] > reached, "the restarted run made no progress"
    reached = _steps(workdir)[-1]
  out, summary = _finish(workdir, STEPS, 1)
  assert 0 < summary["resumed_from"] < STEPS
  assert f"resuming from the checkpoint at step {summary['resumed_from']}" in out
  assert _equal(_restore(workdir, STEPS), final)


def test_an_adapter_run_killed_at_a_random_step_ends_exactly_like_an_uninterrupted_one(tmp_path):
  """QLoRA with adapter dropout: the base is not checkpointed but quantized anew on restart, and
  the dropout masks are drawn by step."""
  init_fn = _adapter_setup()[0]
  reference = tmp_path / "reference"
  _finish(reference, ADAPTER_STEPS, 1, adapters=True)
  workdir = tmp_path / "run"
  proc = _start(workdir, ADAPTER_STEPS, 1, adapters=True, stdout=subprocess.DEVNULL)
  _wait_for_step(workdir, proc, random.Random(1).randint(3, 6))
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  _, summary = _finish(workdir, ADAPTER_STEPS, 1, adapters=True)
  assert 0 < summary["resumed_from"] < ADAPTER_STEPS
  final = _restore(reference, ADAPTER_STEPS, init_fn)
  assert not _equal(
      final.policy.params, _restore(reference, ADAPTER_STEPS - 1, init_fn).policy.params
  )
  assert _equal(_restore(workdir, ADAPTER_STEPS, init_fn), final)


def test_sigterm_saves_the_step_it_interrupts(tmp_path, reference):
  _, final = reference
  workdir = tmp_path / "run"
  # every=1000: Orbax saves only the first step by itself, so another checkpoint is SIGTERM's.
  proc = _start(workdir, STEPS, 1000, stdout=subprocess.PIPE)
  for line in proc.stdout:
    if line.startswith("batch 6"):
      break
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  assert proc.returncode == 130, _stderr(workdir)
  message = _stderr(workdir).strip().splitlines()[-1]
  assert "stopped by signal 15 at step" in message and "rerun the same command" in message
  stopped = int(message.split("at step ")[1].split("/")[0])
  assert stopped >= 6 and _steps(workdir) == [1, stopped]
  _, summary = _finish(workdir, STEPS, 1000)
  assert summary["resumed_from"] == stopped
  assert _equal(_restore(workdir, STEPS), final)


def test_a_damaged_newest_checkpoint_is_set_aside_for_the_one_before(tmp_path, reference):
  ref_dir, final = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  checkpoints = workdir / "checkpoints"
  # A save cut short leaves a temporary directory: it must not count as a step.
  shutil.copytree(checkpoints / str(STEPS), checkpoints / f"{STEPS + 1}.orbax-checkpoint-tmp-1")
  files = [p for p in (checkpoints / str(STEPS)).rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  out, summary = _finish(workdir, STEPS, 1)
  bad = checkpoints / str(STEPS)
  warning = [l for l in out.splitlines() if "does not restore" in l]
  assert len(warning) == 1 and f"the checkpoint {bad} does not restore" in warning[0], out
  assert summary["resumed_from"] == STEPS - 1
  assert os.path.isdir(f"{bad}.unreadable")
  assert _equal(_restore(workdir, STEPS), final)


def test_checkpoints_that_never_restore_are_an_error_not_a_fresh_start(tmp_path):
  """Checkpoints of something else fail at every step (as after a change of model): the run says
  so instead of starting from scratch, and renames nothing."""
  ckpt = Checkpoints(tmp_path / "checkpoints", every=1)
  for step in (1, 2):
    ckpt.save(step, {"other": np.zeros(3, np.float32)})
  ckpt.close()
  with pytest.raises(UserError, match="no checkpoint in .* restores .* use a new --workdir"):
    _train(tmp_path, 4, 1)
  assert _steps(tmp_path) == [1, 2]


def _scaled_dqo_setup():
  """The DQO step with its value loss multiplied by the mean of batch['scale'] [B]: NaN there
  makes only the value loss non-finite, and neither model may move."""
  init_fn, _, policy, value = dqo_setup()
  objective = dqo.objective(DQO)

  def scaled(logp, values, batch, step):
    policy_loss, value_loss, metrics = objective(logp, values, batch, step)
    return policy_loss, lambda v: value_loss(v) * jnp.mean(batch["scale"]), metrics

  return init_fn, make_policy_value_step(
      policy, value, make_optimizer(OPT, 10), make_optimizer(OPT, 10), scaled
  )


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
  init_fn, step_fn = _scaled_dqo_setup()
  bad = lambda i: i == 1 or i >= 4  # 0-based: step 2 alone, then steps 5, 6, 7 in a row
  batch_at = lambda i: dict(_batch_at(i), scale=np.full(16, np.nan if bad(i) else 1.0, np.float32))
  with pytest.raises(UserError) as e:
    _train(
        tmp_path,
        20,
        1,
        init_fn=init_fn,
        step_fn=step_fn,
        batch_at=batch_at,
        keep=20,
        max_nonfinite=3,
        log_every=1,
    )
  message = str(e.value)
  assert "steps 5-7 of 20" in message and "non-finite" in message
  assert f"saved in {tmp_path / 'checkpoints' / '7'};" in message
  assert _steps(tmp_path) == list(range(1, 8))
  state = {s: _restore(tmp_path, s, init_fn) for s in (1, 2, 3, 4, 7)}
  assert _equal(state[2], state[1]), "a skipped step changed the state"
  assert not _equal(state[3].policy.params, state[2].policy.params)
  assert not _equal(state[3].value.params, state[2].value.params)
  assert _equal(state[7], state[4]), "the saved state is not the last good one"
  assert int(state[7].policy.step) == int(state[7].value.step) == 3
  skipped = [v for _, v in read_scalars(str(tmp_path / "tb"))["skipped_updates"]]
  assert skipped == [0, 1, 0, 0, 1, 1, 1]


def test_a_resumed_run_counts_the_skipped_updates_of_the_runs_before_it(tmp_path, monkeypatch):
  """The summary's skipped_updates (what results.json reports) used to count only the steps of
  the last run."""
  init_fn, step_fn = _scaled_dqo_setup()
  batch_at = lambda i: dict(_batch_at(i), scale=np.full(16, np.nan if i == 1 else 1.0, np.float32))
  train = lambda: _train(tmp_path, 6, 2, init_fn=init_fn, step_fn=step_fn, batch_at=batch_at)
  with monkeypatch.context() as patch:
    patch.setattr(Checkpoints, "reached_preemption", lambda self, step: step == 4)
    with pytest.raises(Interrupted):
      train()
  _, summary = train()
  assert summary["resumed_from"] == 4 and summary["skipped_updates"] == 1


def test_a_preemption_notice_saves_the_step_and_stops(tmp_path, monkeypatch):
  """JAX's preemption service needs several hosts; here its answer is stubbed."""
  monkeypatch.setattr(Checkpoints, "reached_preemption", lambda self, step: step == 3)
  with pytest.raises(Interrupted, match="stopped by a preemption notice at step 3/10"):
    _train(tmp_path, 10, 1000)
  assert _steps(tmp_path) == [1, 3]


if __name__ == "__main__":
  workdir, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  adapters = sys.argv[4:] == ["lora"]

  def announced(i):
    print(f"batch {i}", flush=True)
    return _batch_at(i)

  try:
    _, summary = _train(workdir, steps, every, batch_at=announced, adapters=adapters)
  except Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(130)
  print(json.dumps(summary))


def test_zero_steps_leave_the_initial_state_as_the_checkpoint(tmp_path):
  """`sft.steps=0` (a pretrained model or an imported adapter evaluated as it is): the stages
  after it read a checkpoint, the initial state."""
  state, summary = _train(tmp_path, 0, 5)
  assert summary["steps"] == 0 and _steps(tmp_path) == [0]
  assert _equal(_restore(tmp_path, 0), state)
