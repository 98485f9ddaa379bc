"""The command a user runs, end to end on the reduced config: every stage's outputs, skipping
finished stages, resuming after SIGTERM, and one-line errors for bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from dqo_jax.data.offline import FIELDS, read_records, write_records

from tiny_run import ROOT
from tiny_run import command as _cmd


def _run(workdir, *overrides, timeout=600):
  return subprocess.run(
      _cmd(workdir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


STAGE_DIRS = ("sft", "sample", "dqo", "eval/dqo")


def test_every_stage_writes_its_outputs(finished):
  workdir, proc = finished
  for stage in STAGE_DIRS:
    assert os.path.exists(workdir / stage / "DONE.json"), stage
  assert not os.path.exists(workdir / "rollouts"), "rollouts are only for process supervision"
  # Monitored while training: validation accuracy, and the objective of fresh samples on
  # training and validation prompts; never the test split.
  monitored = json.loads((workdir / "dqo" / "DONE.json").read_text())["summary"]["final_metrics"]
  assert {"val_accuracy", "train_prompts_objective", "val_objective"} <= monitored.keys()
  assert "accuracy" not in monitored
  for stage in ("sft", "dqo"):
    steps = [d for d in os.listdir(workdir / stage / "checkpoints") if d.isdigit()]
    assert str({"sft": 20, "dqo": 10}[stage]) in steps
    assert any(f.startswith("events") for f in os.listdir(workdir / stage / "tb"))
  records = read_records(str(workdir / "sample" / "samples.array_record"))
  assert len(records) == 32 * 2
  for r in records:
    assert set(FIELDS) <= r.keys()
    assert len(r["response"]) == len(r["behaviour_logprobs"]) == len(r["ref_logprobs"]) > 0
    assert r["finish"] in ("eos", "length")
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"sft", "dqo"}
  for r in results.values():
    assert r["skipped_updates"] == 0
    assert 0.0 <= r["accuracy"] <= 1.0 and set(r["by_steps"]) <= {"2", "3", "4", "5"}
    s = r["sampled"]
    assert s["k"] == 4 and 0.0 <= s["accuracy"] <= s["pass_at_k"] <= 1.0
    assert s["maj_at_k"] <= s["pass_at_k"]
    assert r["validation"]["n"] == 31  # 32 held out, one longer than the limits
    for o in r["objective"].values():
      assert abs(o["objective"] - (o["reward"] - 0.5 * o["kl"])) < 1e-6
  # The SFT policy is pi_ref: the log-ratio of every sampled token is 0 exactly.
  assert results["sft"]["objective"]["train"]["kl"] == 0.0
  assert results["dqo"]["objective"]["train"]["kl"] != 0.0
  assert "Accuracy on the test split" in proc.stdout and "maj@4" in proc.stdout
  assert "obj train" in proc.stdout


def test_output_to_a_file_is_lines_without_progress_bar_redraws(finished):
  _, proc = finished  # stdout and stderr are pipes, as a log file is: not terminals
  log = proc.stdout + proc.stderr
  assert "\r" not in log and "\x1b[" not in log
  for stage in ("sft", "sample", "dqo", "eval/dqo"):
    assert f"[{stage}] done in " in log


def test_rerun_skips_finished_stages(finished):
  workdir, _ = finished
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for stage in STAGE_DIRS:
    assert f"[{stage}] already complete" in proc.stdout


def _wait_for_checkpoint(directory, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
      return
    assert proc.poll() is None, "the run ended before writing a checkpoint"
    time.sleep(0.2)
  raise TimeoutError(directory)


def test_a_run_stopped_by_sigterm_resumes_from_its_checkpoint(tmp_path):
  # A SIGKILLed run resuming exactly as an uninterrupted one is tests/test_preemption.py's.
  # Enough steps that the run is still going when the first checkpoint appears and the signal
  # is sent (the wait polls every 0.2 s); few enough that the resumed run ends quickly.
  overrides = ("--config.stages=sft", "--config.sft.steps=150", "--config.checkpoint.every=5")
  proc = subprocess.Popen(
      _cmd(tmp_path, *overrides),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  _wait_for_checkpoint(tmp_path / "sft" / "checkpoints", proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "rerun the same command to resume" in err
  assert not os.path.exists(tmp_path / "sft" / "DONE.json")
  again = _run(tmp_path, *overrides)
  assert again.returncode == 0, again.stderr[-2000:]
  resumed = [
      l
      for l in again.stderr.splitlines() + again.stdout.splitlines()
      if "resuming from the checkpoint at step" in l
  ]
  assert resumed and int(resumed[0].rsplit(" ", 1)[1]) > 0
  assert json.loads((tmp_path / "sft" / "DONE.json").read_text())["summary"]["resumed_from"] > 0


# One case per place that refuses input before the pipeline runs: the flag parser, the
# multi-host flags, and the checks after the config (whose messages tests/test_bad_input.py
# checks in-process, case by case).
@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.dqo.betaa=1", "unknown config key"),
        ("--config.dqo.beta=abc", "could not convert string to float"),
        ("--num_processes=2", "needs all of --coordinator_address=HOST:PORT"),
        ("--config.model.attention=pallas_tpu", "runs only on TPU (here: cpu)"),
        ("--config.method=ppo", "choose from sft, rft, dpo, kto, rloo, dro, dqo"),
        ("--config.train.round_reference=last", "choose from sft, previous"),
        ("--config.train.value_optimizer.name=lion", "choose from adamw, adafactor"),
    ],
)
def test_bad_config_gets_one_line_error(tmp_path, override, expected):
  proc = _run(tmp_path, override)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_a_run_that_fails_its_checks_leaves_config_json_as_it_was(finished):
  """A `train.batch_size=-8` run used to replace config.json (and fail with a traceback); the
  next normal run then warned about a change that never trained."""
  workdir, _ = finished
  before = (workdir / "config.json").read_bytes()
  proc = _run(workdir, "--config.train.batch_size=-8")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: config.train.batch_size=-8 must be a positive number of rows"
  ]
  assert (workdir / "config.json").read_bytes() == before


def _copy_of(finished, tmp_path):
  """A copy of the finished workdir, for a test that adds to it: the others then see the first
  run's outputs alone, whatever order the tests run in."""
  workdir = tmp_path / "copy"
  shutil.copytree(finished[0], workdir)
  return workdir


def _hostile_copy(finished, tmp_path, change):
  """The finished workdir's SFT model and samples, with `change(record, index)` applied to
  every offline sample."""
  workdir = _copy_of(finished, tmp_path)
  path = str(workdir / "sample" / "samples.array_record")
  records = read_records(path)
  for i, r in enumerate(records):
    change(r, i)
  write_records(path, records)
  return workdir


def _error_line(proc):
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_a_run_stopped_by_the_nonfinite_guard_is_not_made_done_by_a_rerun(finished, tmp_path):
  """NaN log-probs in every sample make every DQO step non-finite (as token ids past the
  vocabulary did before they were refused on reading). The guard stopped the run, but rerunning
  the same command used to resume, write DONE and evaluate the SFT policy as DQO."""

  def nan_logprobs(record, i):
    record["ref_logprobs"] = [float("nan")] * len(record["response"])

  workdir = _hostile_copy(finished, tmp_path, nan_logprobs)
  settings = ("--config.stages=train,eval", "--config.train.steps=3")
  settings += ("--config.train.max_consecutive_nonfinite=2",)
  proc = _run(workdir, *settings, "--redo=train")
  assert "[redo] removed the outputs of dqo, eval/dqo" in proc.stdout
  line = _error_line(proc)
  assert "[dqo] steps 1-2 of 3 all had a non-finite loss or gradient" in line
  assert "--redo=train starts the stage over" in line
  line = _error_line(_run(workdir, *settings))  # the same command, again
  assert "[dqo] an earlier run stopped: steps 1-2 of 3 all had a non-finite" in line
  assert "with --redo=train" in line
  assert not os.path.exists(workdir / "dqo" / "DONE.json")
  assert not os.path.exists(workdir / "eval" / "dqo" / "result.json")


def test_a_run_whose_final_metrics_are_nan_fails_saying_how_many_updates_were_skipped(
    finished, tmp_path
):
  """8 of 64 samples with NaN log-probs used to give rc=0 and a NaN summary."""

  def some_nan_logprobs(record, i):
    if i % 8 == 0:
      record["ref_logprobs"] = [float("nan")] * len(record["response"])

  workdir = _hostile_copy(finished, tmp_path, some_nan_logprobs)
  proc = _run(workdir, "--config.stages=train", "--config.train.steps=4", "--redo=train")
  line = _error_line(proc)
  assert "of 4 updates were skipped as non-finite and the final metrics are not finite" in line
  assert not os.path.exists(workdir / "dqo" / "DONE.json")


def test_config_json_of_an_older_version_gets_one_line_error(finished, tmp_path):
  workdir, _ = finished
  old = json.loads((workdir / "config.json").read_text())
  del old["sft"]["grad_accum_steps"], old["eval"]["samples_per_problem"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  cmd = _cmd(tmp_path / "rerun")
  cmd[cmd.index("--config=configs/arith.py:tiny")] = (
      f"--config=configs/from_json.py:{tmp_path / 'config.json'}"
  )
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert "lacks eval.samples_per_problem, sft.grad_accum_steps" in line
  assert "start from configs/arith.py" in line


def test_unwritable_workdir_gets_one_line_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _run(blocker / "run")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "is not writable" in lines[0]


def test_rerun_with_another_config_warns_that_finished_stages_are_kept(finished):
  workdir, _ = finished
  proc = _run(workdir, "--config.dqo.beta=0.25")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "config differs" in proc.stdout and "dqo.beta: 0.5 -> 0.25" in proc.stdout
  assert "[dqo] already complete" in proc.stdout


def test_other_methods_reuse_the_workdirs_sft_model_and_samples(finished, tmp_path):
  """--config.method switches the trained method; SFT and samples are not recomputed. The tiny
  SFT model solves nothing, so DPO finds no pairs and says so in one line."""
  workdir = _copy_of(finished, tmp_path)
  proc = _run(workdir, "--config.method=kto")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[sft] already complete" in proc.stdout and "[sample] already complete" in proc.stdout
  assert "[rollouts] not needed" in proc.stdout and "method: dqo -> kto" not in proc.stdout
  assert os.path.exists(workdir / "kto" / "DONE.json")
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"sft", "dqo", "kto"}
  proc = _run(workdir, "--config.method=dpo")
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: no prompt has both a correct and an incorrect sample: DPO has no pairs; "
      "sample more responses per prompt (sample.samples_per_prompt)"
  )


def test_process_supervision_rolls_out_every_step_once(finished, tmp_path):
  workdir = _copy_of(finished, tmp_path)
  # Rollouts (dqo.process.refill_rows) and evaluation in refilled decode slots.
  proc = _run(workdir, "--config.dqo.process.enabled=True", "--config.eval.refill_rows=8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = read_records(str(workdir / "sample" / "samples.array_record"))
  potentials = read_records(str(workdir / "rollouts" / "potentials.array_record"), "rollouts")
  assert len(potentials) == len(records)
  for r, p in zip(records, potentials):
    assert len(p["potentials"]) == len(p["boundaries"]) + 1
    assert all(r["response"][b] == 4 for b in p["boundaries"])  # 4: the newline piece
    assert all(0.0 <= x <= 1.0 for x in p["potentials"])
  summary = json.loads((workdir / "rollouts" / "DONE.json").read_text())["summary"]
  assert summary["rollouts"] == 2 * summary["prefixes"]  # rollouts_per_step=2 in :tiny
  assert os.path.exists(workdir / "dqo_ps" / "DONE.json")
  assert "dqo_ps" in json.loads((workdir / "results.json").read_text())


def test_rounds_sample_the_last_policy_and_resume_after_a_finished_round(finished, tmp_path):
  """train.rounds=2 with pi_ref updated: round 2 samples the policy round 1 ended with, stores
  that policy's log-probs as pi_ref's (at temperature 1 they equal the sampler's), and trains
  from it. Stopped after round 1, a rerun skips round 1 and ends where the uninterrupted run
  did: the same round-2 samples and the same final metrics."""
  workdir = _copy_of(finished, tmp_path)
  rounds = ("--config.train.rounds=2", "--config.train.round_reference=previous")
  proc = _run(workdir, *rounds, "--config.stages=sft,sample,train", "--redo=train")
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = workdir / "dqo"
  first = json.loads((run / "round1" / "ROUND_DONE.json").read_text())
  assert first["round"] == 1 and first["steps"] == 10
  done = json.loads((run / "DONE.json").read_text())["summary"]
  assert done["round"] == 2 and done["samples"]["num_samples"] == 64
  samples = read_records(str(run / "samples.array_record"))
  assert len(samples) == 64
  gap = max(abs(b - r) for s in samples for b, r in zip(s["behaviour_logprobs"], s["ref_logprobs"]))
  assert gap < 1e-4
  assert samples != read_records(str(workdir / "sample" / "samples.array_record"))
  samples_bytes = (run / "samples.array_record").read_bytes()
  round1_files = {p: p.stat().st_mtime for p in (run / "round1").rglob("*") if p.is_file()}

  for name in ("DONE.json", "checkpoints", "tb", "samples.array_record", "skipped_updates.json"):
    path = run / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  proc = _run(workdir, *rounds, "--config.stages=sft,sample,train")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[dqo] round 2 of 2: 64 samples of the round 1 policy" in proc.stdout
  assert {p: p.stat().st_mtime for p in (run / "round1").rglob("*") if p.is_file()} == round1_files
  assert (run / "samples.array_record").read_bytes() == samples_bytes
  again = json.loads((run / "DONE.json").read_text())["summary"]
  assert again["final_metrics"] == done["final_metrics"]


def test_rounds_are_refused_where_there_is_no_policy_to_sample(tmp_path):
  proc = _run(tmp_path, "--config.train.rounds=2", "--config.dqo.process.enabled=True")
  assert _error_line(proc) == (
      "error: config.train.rounds=2 is not supported here (process supervision's rollouts are "
      "of the SFT policy's samples only); set it to 1"
  )
