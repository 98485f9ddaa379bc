"""`python -m dqo_jax.main --config=configs/gsm8k.py:tiny` end to end on the repository's copy
of the official GSM8K files (data/gsm8k), offline; and the one-line errors of GSM8K/MATH runs
missing their inputs."""

import json
import os
import subprocess
import sys

from dqo_jax.data.offline import FIELDS, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "data", "gsm8k")


def _run(config, workdir, *overrides, timeout=600):
  cmd = [sys.executable, "-m", "dqo_jax.main", f"--config={config}", f"--workdir={workdir}"]
  return subprocess.run(
      cmd + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


def test_gsm8k_tiny_runs_every_stage(tmp_path):
  proc = _run("configs/gsm8k.py:tiny", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[setup] " in proc.stdout and " / 32 test problems" in proc.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["task"] == "gsm8k" and os.path.samefile(config["data"]["local_dir"], GSM8K)
  # Prepared from the local files by the array_record builder, tokenizer beside it.
  (prepared,) = (tmp_path / "data" / "gsm8k_local").iterdir()
  files = os.listdir(prepared / "1.0.0")
  assert any(f.startswith("gsm8k_local-train.array_record") for f in files)
  assert any(f.startswith("tokenizer_1024_") for f in files)
  for stage in ("sft", "sample", "dqo", "eval/dqo"):
    assert os.path.exists(tmp_path / stage / "DONE.json"), stage
  for stage, steps in (("sft", 20), ("dqo", 10)):
    assert str(steps) in os.listdir(tmp_path / stage / "checkpoints")
    assert any(f.startswith("events") for f in os.listdir(tmp_path / stage / "tb"))
  records = read_records(str(tmp_path / "sample" / "samples.array_record"))
  assert len(records) == 32 * 2
  for r in records:
    assert set(FIELDS) <= r.keys() and 2 <= r["num_steps"] <= 11
    assert len(r["response"]) == len(r["behaviour_logprobs"]) == len(r["ref_logprobs"]) > 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results) == {"sft", "dqo"}
  for r in results.values():
    assert r["n"] == 32 and 0.0 <= r["accuracy"] <= 1.0
    assert r["by_steps"] and {int(k) for k in r["by_steps"]} <= set(range(2, 12))
  assert "Accuracy on the test split" in proc.stdout


def _one_line_error(proc, *expected):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  for text in expected:
    assert text in lines[0]


def test_missing_inputs_get_one_line_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
      ("configs/gsm8k.py:tiny", f"--config.data.local_dir={tmp_path / 'nowhere'}"),
      ("configs/gsm8k.py:tiny", f"--config.data.local_dir={empty}"),
      ("configs/gsm8k.py:qwen2_7b",),
      ("configs/math.py:tiny", "--config.data.local_dir="),
  ]
  expected = [
      ("no such directory", "--config.data.local_dir=DIR"),
      ("has no train.jsonl", "--config.data.local_dir=DIR"),
      ("Qwen2-7B", "--config.model.path=DIR"),
      ("MATH needs --config.data.local_dir=DIR", "github.com/hendrycks/math"),
  ]
  for i, ((config, *overrides), texts) in enumerate(zip(cases, expected)):
    _one_line_error(_run(config, tmp_path / f"run{i}", *overrides), *texts)
