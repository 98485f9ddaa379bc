"""One run at a time per workdir: a second run on a workdir in use stops at once with one line
naming the holder and writes nothing; a lock left by a dead run is taken over; the same on a
gs:// workdir (an in-memory GCS server, tests/fake_gcs.py), where the lock is a lease."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import fake_gcs
import tiny_run
from dqo_jax import workdir_lock
from dqo_jax.errors import UserError
from dqo_jax.workdir import LOCK_NAME, Workdir
from tiny_run import ROOT


def _snapshot(directory) -> dict:
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for d, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


def _wait_for_holder(lock_file, proc, timeout=300) -> dict:
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "the first run ended before taking the lock"
    if os.path.exists(lock_file):
      with open(lock_file) as f:
        text = f.read()
      if text:
        return json.loads(text)
    time.sleep(0.05)
  raise TimeoutError(lock_file)


_SFT_ONLY = ("--config.stages=sft", "--config.sft.steps=2")


def test_a_second_run_on_a_workdir_in_use_stops_at_once_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(
      tiny_run.command(workdir, *_SFT_ONLY),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    holder = _wait_for_holder(workdir / LOCK_NAME, first)
    assert holder["pid"] == first.pid
    first.send_signal(signal.SIGSTOP)  # holds the lock, whatever it has written so far
    before = _snapshot(workdir)
    second = subprocess.run(
        tiny_run.command(workdir, *_SFT_ONLY, "--config.dqo.beta=0.05"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert _snapshot(workdir) == before, "the refused run wrote to the workdir"
  finally:
    first.send_signal(signal.SIGCONT)
  assert second.returncode == 2, second.stderr[-3000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1, second.stderr
  assert lines[0] == (
      f"error: --workdir={workdir} is in use by another run (host {socket.gethostname()}, "
      f"pid {first.pid}, started {holder['started']}; lock {workdir}/{LOCK_NAME}): "
      "wait for it to finish, or use another --workdir"
  )
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out[-3000:]
  assert (workdir / "sft" / "DONE.json").exists()
  assert json.loads((workdir / "config.json").read_text())["dqo"]["beta"] == 0.5
  assert not (workdir / LOCK_NAME).exists(), "the lock outlived its run"


_HOLD = """
import sys, time
from dqo_jax import workdir_lock
from dqo_jax.workdir import Workdir
with workdir_lock.held(Workdir(sys.argv[1])):
  print("held", flush=True)
  time.sleep(600)
"""


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLD, str(tmp_path)],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.PIPE,
      text=True,
  )
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(UserError, match=f"in use by another run .*pid {holder.pid}"):
    with workdir_lock.held(Workdir(str(tmp_path))):
      pass
  holder.kill()
  holder.wait()
  assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
  lines = []
  with workdir_lock.held(Workdir(str(tmp_path)), announce=lines.append):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  assert len(lines) == 1 and "took over the lock of a run that no longer holds it" in lines[0]
  assert f"pid {holder.pid}" in lines[0]
  assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A fake bucket `runs`, its store, and a Workdir at gs://runs/w."""
  server, url = fake_gcs.serve(["runs"])
  for key, value in fake_gcs.environment(url).items():
    monkeypatch.setenv(key, value)
  yield server.RequestHandlerClass.store, Workdir(str(tmp_path), "gs://runs/w")
  server.shutdown()


def _put_lock(store, record):
  data = json.dumps(record).encode()
  with store.lock:
    store.objects[("runs", f"w/{LOCK_NAME}")] = (data, store.meta("runs", "w", data, ""))


def _lock_record(store):
  with store.lock:
    entry = store.objects.get(("runs", f"w/{LOCK_NAME}"))
  return json.loads(entry[0]) if entry else None


def test_a_bucket_lease_refuses_a_second_run_and_is_released(bucket):
  store, wd = bucket
  with workdir_lock.held(wd):
    record = _lock_record(store)
    assert record["pid"] == os.getpid()
    with pytest.raises(UserError, match=r"gs://runs/w is in use by another run \(host "):
      with workdir_lock.held(wd):
        pass
  assert _lock_record(store) is None


def test_a_live_lease_of_another_host_is_respected_and_a_stale_one_taken_over(bucket):
  store, wd = bucket
  other = dict(host="elsewhere", pid=7, started="2026-01-01 00:00:00 UTC")
  _put_lock(store, dict(other, refreshed=time.time()))
  with pytest.raises(UserError, match=r"host elsewhere, pid 7, started 2026-01-01 00:00:00 UTC"):
    with workdir_lock.held(wd):
      pass
  _put_lock(store, dict(other, refreshed=time.time() - workdir_lock.LEASE_SECONDS - 1))
  lines = []
  with workdir_lock.held(wd, announce=lines.append):
    assert _lock_record(store)["pid"] == os.getpid()
  assert lines == [
      "took over the stale lock of host elsewhere, pid 7, started 2026-01-01 00:00:00 UTC"
  ]


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(bucket):
  store, wd = bucket
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _put_lock(store, dict(host=socket.gethostname(), pid=dead.pid, refreshed=time.time()))
  lines = []
  with workdir_lock.held(wd, announce=lines.append):
    pass
  assert len(lines) == 1 and f"pid {dead.pid}" in lines[0]


def test_the_lease_is_refreshed_while_held(bucket, monkeypatch):
  store, wd = bucket
  monkeypatch.setattr(workdir_lock, "REFRESH_SECONDS", 0.05)
  with workdir_lock.held(wd):
    first = _lock_record(store)["refreshed"]
    deadline = time.time() + 60
    while _lock_record(store)["refreshed"] == first and time.time() < deadline:
      time.sleep(0.05)
    assert _lock_record(store)["refreshed"] > first


def test_of_several_runs_taking_over_a_stale_lease_exactly_one_wins(bucket):
  store, wd = bucket
  _put_lock(store, dict(host="elsewhere", pid=7, refreshed=0.0))
  won, refused, go = [], [], threading.Barrier(4)

  def contender():
    lock = workdir_lock._BucketLock(wd.url)
    go.wait()
    try:
      lock.acquire(announce=lambda line: None)
    except UserError as e:
      refused.append(str(e))
      return
    won.append(lock)

  threads = [threading.Thread(target=contender) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(refused) == 3, refused
  won[0].release()
  assert _lock_record(store) is None
