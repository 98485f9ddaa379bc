"""`python -m dqo_jax.compare`: whole pipelines per seed, paired against each seed's SFT start,
scored on validation without reading test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_run import ROOT


def test_compare_pairs_seeds_of_whole_pipelines_on_validation(tmp_path):
  cmd = [
      sys.executable,
      "-m",
      "dqo_jax.compare",
      f"--config={os.path.join(ROOT, 'configs', 'arith.py')}:tiny",
      "--workdir=cmp",
      "--methods=dro",
      "--seeds=2",
      "--parallel=2",
      "--split=validation",
      "--base_per_seed",
      "--config.data.num_gold=150",  # of 221: SFT on 150 gold solutions, prompts from the rest
  ]
  # Outside the repository, with a relative workdir: nothing may depend on the working directory.
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  tmp_path = tmp_path / "cmp"
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  compared = json.loads((tmp_path / "compare.json").read_text())
  summary = compared["summary"]
  assert set(summary) == {"dro"} and summary["dro"]["seeds"] == 2
  for method in ("dro",):
    for seed in (0, 1):  # seed k's runs share the SFT model of base/seed<k>
      link = os.path.realpath(tmp_path / "runs" / method / f"seed{seed}" / "sft")
      assert link == os.path.realpath(tmp_path / "base" / f"seed{seed}" / "sft")
      result = compared["runs"][method][str(seed)]
      assert "accuracy" not in result and "validation" in result  # test was not read
  for seed in (0, 1):
    base = tmp_path / "base" / f"seed{seed}"
    assert json.loads((base / "sft" / "DONE.json").read_text())["summary"]["examples"] == 150
    sampled = json.loads((base / "sample" / "DONE.json").read_text())["summary"]
    assert sampled["num_prompts"] == 32  # of the 71 answers-only problems (test_views.py)
  starts = compared["sft_start"]
  assert set(starts) == {"0", "1"} and all("accuracy" not in r for r in starts.values())
  # The paired interval: the mean of the per-seed differences from that seed's SFT start.
  diffs = [
      compared["runs"]["dro"][k]["validation"]["accuracy"] - starts[k]["validation"]["accuracy"]
      for k in ("0", "1")
  ]
  mean, low, high = summary["dro"]["greedy_minus_start"]
  assert mean == pytest.approx(np.mean(diffs)) and low <= mean <= high
  table = (tmp_path / "compare.md").read_text()
  assert "| SFT checkpoint (start) | 2 |" in table and "| dro | 2 |" in table
  assert "Scored on the validation split" in table
  assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
