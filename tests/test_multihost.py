"""Two processes on this machine (4 CPU devices each, gloo collectives) run the embedded config's
pipeline as one 8-device process does: the same SFT and DQO losses at every step, the same
samples, the same test accuracy. As on a TPU pod, their workdir is a gs:// URL (an in-memory GCS
server, tests/fake_gcs.py) and each has its own local copy: only process 0 writes files and
summaries, both write their shards of every checkpoint to the bucket, and process 1 reads the
data and samples process 0 copied up."""

import json
import os
import socket
import subprocess

import numpy as np

import fake_gcs
import tiny_run
from dqo_jax.data.offline import read_records
from dqo_jax.metrics import read_scalars
from tiny_run import ROOT

DQO_STEPS = 4
OVERRIDES = (
    f"--config.train.steps={DQO_STEPS}",
    "--config.log_every=1",
    "--config.eval.every=2",
    "--config.eval.samples_per_problem=0",
    # Refilled decode slots over 8 devices in two processes (the tiny config uses batches).
    "--config.sample.refill_rows=8",
    "--config.eval.refill_rows=8",
    # The tiny SFT model solves nothing: with every reward 0 the value model would fit float
    # noise, which Adam scales up to full-size steps. A reward of -1 gives it something to learn.
    "--config.rewards.incorrect=-1",
    "--config.rewards.unparseable=-1",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  return dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      **extra,
  )


def _cmd(workdir, *extra):
  return tiny_run.command(workdir, *OVERRIDES, *extra)


def _one_process(workdir):
  proc = subprocess.run(
      _cmd(workdir), cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]


def _two_processes(url, cache, gcs_env):
  address = f"localhost:{_free_port()}"
  procs = [
      subprocess.Popen(
          _cmd(
              url,
              f"--cache_dir={cache}",
              f"--coordinator_address={address}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          cwd=ROOT,
          env=_env(4, **gcs_env),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


def test_two_processes_run_the_pipeline_as_one_8_device_process(tmp_path):
  server, url = fake_gcs.serve(["runs"])
  store = server.RequestHandlerClass.store
  try:
    one = tmp_path / "one"
    _one_process(one)
    outputs = _two_processes("gs://runs/two", tmp_path / "cache", fake_gcs.environment(url))
  finally:
    server.shutdown()
  assert "devices 8 (mesh {'data': 8" in outputs[0]
  with store.lock:
    remote = {n for _, n in store.objects}
  caches = [tmp_path / "cache" / "gs" / "runs" / "two" / f"process_{i}" for i in (0, 1)]
  two = caches[0]
  # Process 1 read what process 0 copied up.
  assert (caches[1] / "sample" / "samples.array_record").exists()
  for stage, steps in (("sft", 20), ("dqo", DQO_STEPS)):
    assert len([n for n in remote if n.startswith(f"two/{stage}/tb/")]) == 1  # process 0's
    scalars_1, scalars_2 = read_scalars(one / stage / "tb"), read_scalars(two / stage / "tb")
    assert scalars_1.keys() == scalars_2.keys()
    loss = "loss" if stage == "sft" else "value_loss"
    assert [s for s, _ in scalars_2[loss]] == list(range(1, steps + 1))
    for tag, series in scalars_1.items():
      expected = np.array([v for _, v in series])
      # Sums over 8 devices in another order: float noise on the scale of the whole series
      # (a log-ratio that starts at 0 has no scale of its own), and at least that of a sequence's
      # log-ratio, a sum over its tokens of differences of float32 log-probs of order 1 to 10
      # whose rounding moves with the order of the sums (seen: 1.7e-6 at step 1, where it is 0).
      np.testing.assert_allclose(
          [v for _, v in scalars_2[tag]],
          expected,
          rtol=1e-3,
          atol=1e-3 * np.abs(expected).max() + 1e-5,
          err_msg=f"{stage}/{tag}",
      )
    # Orbax wrote the last step's checkpoint to the bucket, from both processes, with its digest.
    for i in (0, 1):
      assert f"two/{stage}/checkpoints/{steps}/default/array_metadatas/process_{i}" in remote
    assert f"two/{stage}/checkpoints/{steps}/digest/_METADATA" in remote
  assert "two/.lock.json" not in remote  # process 0's lock, released; process 1 took none
  # Sampling shards the prompts over both processes and gathers them back in order.
  samples_1 = read_records(str(one / "sample" / "samples.array_record"))
  samples_2 = read_records(str(two / "sample" / "samples.array_record"))
  assert [r["response"] for r in samples_2] == [r["response"] for r in samples_1]
  for a, b in zip(samples_1, samples_2):
    np.testing.assert_allclose(b["ref_logprobs"], a["ref_logprobs"], atol=1e-5)
    np.testing.assert_allclose(b["behaviour_logprobs"], a["behaviour_logprobs"], atol=1e-5)
  results_1 = json.loads((one / "results.json").read_text())
  results_2 = json.loads((two / "results.json").read_text())
  # Accuracies are counts and must agree exactly; the objective's KL sums log-probs, which the
  # two meshes compute in a different order.
  for r in results_1:
    for split, o in results_1[r]["objective"].items():
      o2 = results_2[r]["objective"][split]
      for key in ("kl", "objective"):
        assert abs(o2.pop(key) - o.pop(key)) < 1e-5, (r, split, key)
  assert results_2 == results_1 and set(results_1) == {"sft", "dqo"}
