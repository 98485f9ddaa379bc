"""The command a user runs, with LoRA adapters (`--config.model.lora.rank`): SFT's and DQO's."""

import json
import subprocess

import tiny_run
from helpers import saved_arrays


def test_the_pipeline_trains_adapters_in_sft_and_dqo(tmp_path):
  """The command a user runs, with adapters: SFT's over the fresh model, DQO's over the SFT
  policy; both stages' checkpoints hold adapters (and DQO's value head) alone, and the
  evaluation reads the folded policies."""
  proc = subprocess.run(
      tiny_run.command(tmp_path, "--config.model.lora.rank=4"),
      cwd=tiny_run.ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for run in ("sft", "dqo"):
    saved = saved_arrays(tmp_path / run / "checkpoints")
    assert saved and all(k[-1].endswith(("_lora_a", "_lora_b", "value_head")) for k in saved)
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results) == {"sft", "dqo"}
  # The samples were drawn from the folded SFT policy whose log-probs are the reference.
  sample = json.loads((tmp_path / "sample" / "DONE.json").read_text())["summary"]
  assert sample["max_abs_behaviour_minus_reference_logprob"] < 1e-4
