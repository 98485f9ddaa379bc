"""`--workdir=gs://BUCKET/PATH`, against an in-memory GCS server (tests/fake_gcs.py): Orbax
writes the checkpoints to the bucket, the other files reach it through a local copy, and a run
killed on one machine resumes on a fresh one from the bucket alone."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

import fake_gcs
import tiny_run
from tiny_run import ROOT


@pytest.fixture(scope="module")
def gcs():
  server, url = fake_gcs.serve(["runs"])
  env = dict(os.environ, JAX_PLATFORMS="cpu", **fake_gcs.environment(url))
  yield server.RequestHandlerClass.store, env
  server.shutdown()


def _cmd(workdir, cache, *overrides):
  return tiny_run.command(workdir, f"--cache_dir={cache}", *overrides)


def _run(env, cache, *overrides, workdir="gs://runs/a"):
  return subprocess.run(
      _cmd(workdir, cache, *overrides),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _names(store, prefix):
  with store.lock:
    return sorted(n[len(prefix) :] for b, n in store.objects if n.startswith(prefix))


def _wait_for_remote_checkpoint(store, prefix, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    # Orbax marks a finished step on GCS with commit_success.txt (there is no atomic rename).
    if any(re.fullmatch(r"\d+/commit_success.txt", n) for n in _names(store, prefix)):
      return
    assert proc.poll() is None, "the run ended before writing a checkpoint"
    time.sleep(0.2)
  raise TimeoutError(prefix)


def test_killed_run_resumes_on_a_fresh_machine_from_the_bucket(gcs, tmp_path):
  store, env = gcs
  overrides = ("--config.sft.steps=60", "--config.checkpoint.every=5")
  first = subprocess.Popen(
      _cmd("gs://runs/a", tmp_path / "vm1", *overrides),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  _wait_for_remote_checkpoint(store, "a/sft/checkpoints/", first)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  # The TensorBoard events written so far went up with the checkpoint.
  assert any(n.startswith("sft/tb/events") for n in _names(store, "a/"))
  assert "sft/DONE.json" not in _names(store, "a/")

  # Another machine: an empty local copy, the bucket as it was left.
  again = _run(env, tmp_path / "vm2", *overrides)
  assert again.returncode == 0, again.stderr[-3000:]
  log = again.stdout + again.stderr
  assert "[setup] copied the files of gs://runs/a" in log
  resumed = re.search(r"\[sft\] resuming from the checkpoint at step (\d+)", log)
  assert resumed and int(resumed.group(1)) > 0

  remote = _names(store, "a/")
  for stage in ("sft", "sample", "dqo", "eval/dqo"):
    assert f"{stage}/DONE.json" in remote, stage
  assert "sample/samples.array_record" in remote and "results.json" in remote
  assert "sft/checkpoints/60/commit_success.txt" in remote
  assert "dqo/checkpoints/10/commit_success.txt" in remote
  assert len([n for n in remote if n.startswith("sft/tb/events")]) == 2  # one per run start
  local = tmp_path / "vm2" / "gs" / "runs" / "a" / "process_0"
  assert not any("checkpoints" in d for d, _, _ in os.walk(local)), "checkpoints stay remote"
  with store.lock:
    remote_results = json.loads(store.objects[("runs", "a/results.json")][0])
  assert remote_results == json.loads((local / "results.json").read_text())

  # A third machine finds every stage finished.
  third = _run(env, tmp_path / "vm3", *overrides)
  assert third.returncode == 0, third.stderr[-3000:]
  for stage in ("sft", "sample", "dqo", "eval/dqo"):
    assert f"[{stage}] already complete" in third.stdout


@pytest.mark.parametrize(
    "workdir, expected",
    [
        ("gs://no-such-bucket/run", "is not writable"),
        ("xyz://b/run", "no filesystem for xyz://"),
    ],
)
def test_unusable_url_gets_one_line_error(gcs, tmp_path, workdir, expected):
  _, env = gcs
  proc = _run(env, tmp_path / "cache", workdir=workdir)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
  assert not os.path.exists(os.path.join(ROOT, workdir.split(":")[0] + ":"))


def test_copies_move_changed_files_only_and_done_json_last(gcs, tmp_path, monkeypatch):
  from dqo_jax.workdir import Workdir

  store, env = gcs
  for key in fake_gcs.environment(""):
    monkeypatch.setenv(key, env[key])
  files = {"sft/DONE.json": "{}", "sft/tb/events": "e1", "sft/checkpoints/5/x": "c", "z.json": "1"}
  for rel, text in files.items():
    (tmp_path / "here" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "here" / rel).write_text(text)
  here = Workdir(str(tmp_path / "here"), "gs://runs/unit")
  assert here.push() == 3
  assert _names(store, "unit/") == ["sft/DONE.json", "sft/tb/events", "z.json"]
  with store.lock:
    arrival = [n for b, n in store.objects if n.startswith("unit/")]
  assert arrival[-1] == "unit/sft/DONE.json"  # a stage is marked done once its files are up
  assert here.push() == 0
  (tmp_path / "here" / "z.json").write_text("22")
  assert here.push() == 1

  there = Workdir(str(tmp_path / "there"), "gs://runs/unit")
  assert there.pull() == 3 and there.pull() == 0
  assert (tmp_path / "there" / "z.json").read_text() == "22"
  assert not (tmp_path / "there" / "sft" / "checkpoints").exists()
  (tmp_path / "here" / "sft" / "tb" / "events").write_text("e1e2")
  here.push()
  assert there.pull() == 1 and (tmp_path / "there" / "sft" / "tb" / "events").read_text() == "e1e2"


def test_redo_removes_the_outputs_in_the_bucket_too(gcs, tmp_path, monkeypatch):
  """Else the first copy from the bucket would bring back the DONE.json that --redo removed."""
  from etils import epath

  from configs.arith import get_config
  from dqo_jax.stages import redo
  from dqo_jax.workdir import Workdir

  store, env = gcs
  for key in fake_gcs.environment(""):
    monkeypatch.setenv(key, env[key])
  files = ["sample/DONE.json", "sample/samples.array_record", "dqo/DONE.json", "sft/DONE.json"]
  for rel in files:
    (tmp_path / "here" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "here" / rel).write_text("{}")
  here = Workdir(str(tmp_path / "here"), "gs://runs/redo")
  here.push()
  # Orbax's checkpoints are only at the URL.
  epath.Path("gs://runs/redo/dqo/checkpoints/10/x").write_text("c")
  assert redo.redo(get_config("tiny"), here, ["sample"]) == ["sample", "dqo"]
  assert _names(store, "redo/") == ["sft/DONE.json"]
  there = Workdir(str(tmp_path / "there"), "gs://runs/redo")
  assert there.pull() == 1
