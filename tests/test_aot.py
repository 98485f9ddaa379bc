"""--compile_only: the DQO step compiled for a TPU slice from abstract shapes, on this CPU.

Needs libtpu, which the README's test command installs into aot.LIBTPU_DIR
(requirements-aot.txt): without it the compile test fails, it does not skip.
"""

import os
import subprocess
import sys

import pytest

from configs.arith import get_config
from dqo_jax import aot
from dqo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arith_tiny():
  return get_config("tiny")


@pytest.mark.parametrize(
    "name, grid",
    [
        ("v4-8", (2, 2, 1)),
        ("v4-16", (2, 2, 2)),
        ("v5p-64", (2, 4, 4)),
        ("v5p-128", (4, 4, 4)),
        ("v5litepod-16", (4, 4)),
        ("v5e-32", (4, 8)),
        ("v6e-1", (1, 1)),
        ("v6e-8", (2, 4)),
    ],
)
def test_slice_names_give_cloud_tpu_chip_grids(name, grid):
  assert aot.parse_topology(name)[2] == grid


@pytest.mark.parametrize("name", ["v9-8", "v5p-12", "v4-2", "v5e-3", "tpu"])
def test_unknown_topology_is_one_line_listing_examples(name):
  with pytest.raises(UserError, match="v5p-16.*v6e-8"):
    aot.parse_topology(name)


def test_libtpu_outside_site_packages_is_found_for_the_compile_alone(tmp_path, monkeypatch):
  library = tmp_path / "libtpu" / "libtpu.so"
  library.parent.mkdir()
  library.write_bytes(b"")
  monkeypatch.setattr(aot, "LIBTPU_DIR", str(tmp_path))
  monkeypatch.setitem(sys.modules, "libtpu", None)  # not importable, as the README installs it
  environ = {}
  monkeypatch.setattr(os, "environ", environ)
  aot._point_jax_at_libtpu()
  assert environ == {"TPU_LIBRARY_PATH": str(library)}
  # A library the user names wins.
  environ["TPU_LIBRARY_PATH"] = str(tmp_path / "mine.so")
  aot._point_jax_at_libtpu()
  assert environ == {"TPU_LIBRARY_PATH": str(tmp_path / "mine.so")}


def test_compile_only_reports_memory_and_flops_of_the_dqo_step():
  tpu_env = lambda: {k: v for k, v in os.environ.items() if k.startswith("TPU_")}
  env = tpu_env()
  config = _arith_tiny()
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  config.model.update(dtype="bfloat16", remat="full")
  r = aot.compile_step(config, "v4-8")
  assert r["chips"] == 4 and r["mesh"] == dict(data=2, fsdp=2, tensor=1)
  assert r["device_kind"] == "TPU v4"
  # bf16 compute, float32 master weights and optimizer state.
  assert r["state_dtypes"] == ["float32"] and r["dtype"] == "bfloat16"
  assert 0 < r["policy_params"] <= r["arguments"] <= r["peak"] <= r["resident"] < r["hbm"]
  assert r["value_params"] > 0 and r["optimizer_state"] > 0
  assert r["flops_per_chip"] > 0 and r["tokens_per_s"] > 0
  assert "per chip" in aot.format_report(r)
  # libtpu's TPU_* placeholders must not leak to child processes (which would then start
  # jax.distributed as hosts of a pod).
  assert tpu_env() == env


def test_compile_only_reports_smaller_optimizer_states_and_whole_step_flops_of_micro_batches():
  config = _arith_tiny()
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  adamw = aot.compile_step(config, "v4-8")
  for key in ("policy_optimizer", "value_optimizer"):
    config.train[key].mu_dtype = "bfloat16"
  half_mu = aot.compile_step(config, "v4-8")
  assert half_mu["state_dtypes"] == ["bfloat16", "float32"]
  assert half_mu["optimizer_state"] == pytest.approx(0.75 * adamw["optimizer_state"], rel=0.01)
  assert "(AdamW moments, mu in bfloat16)" in aot.format_report(half_mu)
  for key in ("policy_optimizer", "value_optimizer"):
    config.train[key].update(name="adafactor", mu_dtype="float32")
  # The tiny model's matrices are narrower than Adafactor factors (128): a full second moment.
  r = aot.compile_step(config, "v4-8")
  assert r["optimizer_state"] == pytest.approx(0.5 * adamw["optimizer_state"], rel=0.01)
  assert "(Adafactor factored moments)" in aot.format_report(r)
  # Micro-batches are a loop whose body XLA counts once: the FLOPs are still the whole step's.
  config.train.grad_accum_steps = 2
  accumulated = aot.compile_step(config, "v4-8")
  assert accumulated["flops_per_chip"] == pytest.approx(r["flops_per_chip"], rel=0.1)


def test_compile_only_reports_the_adapters_and_the_frozen_base_of_a_lora_run():
  config = _arith_tiny()
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  full = aot.compile_step(config, "v4-8")
  config.model.lora.rank = 2
  for stage in ("sft", "train"):
    r = aot.compile_step(config, "v4-8", stage)
    assert r["lora_rank"] == 2 and r["params"] == full["params"]
    assert 0 < r["trained_params"] < r["params"] / 2
    # The base is held once, in the step's arguments; the state holds the adapters.
    assert 0 < r["policy_params"] < r["base_params"] <= r["arguments"]
    assert r["optimizer_state"] < full["optimizer_state"] / 2
    assert "frozen base" in aot.format_report(r)
  # QLoRA: the same weights, their projections stored in 4 bits (the embedding stays float32).
  config.model.lora.update(base_qtype="nf4", base_tile_size=8)
  q = aot.compile_step(config, "v4-8")
  assert q["params"] == full["params"] and q["trained_params"] == r["trained_params"]
  assert q["base_params"] < 0.6 * r["base_params"]
  assert "projections in nf4" in aot.format_report(q)


def test_compile_only_compiles_the_sft_step_and_every_methods_step(capsys):
  config = _arith_tiny()
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  config.eval.refill_rows = 8  # evaluation in refilled decode slots, sampling in batches
  config.model.scan_layers = True  # as the pretrained presets: decoding slices stacked layers
  # stages sft,...,eval: the SFT and the DQO step, the sampler, the reference log-probs and the
  # evaluation's greedy decoding
  reports = aot.run(config, "v4-8")
  assert set(reports) == {"sft", "train", "sample", "reference", "eval"}
  assert reports["sft"]["value_params"] == 0
  assert reports["sft"]["batch"] == config.sft.batch_size
  for name, batch in (
      ("sample", config.sample),
      ("reference", config.sample),
      ("eval", config.eval),
  ):
    r = reports[name]
    assert r["batch"] == batch.batch_size and 0 < r["params_bytes"] <= r["arguments"] < r["peak"]
  assert reports["sample"]["new_tokens"] == config.data.max_response_len
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("every program fits on v4-8")
  assert any(
      line.startswith("sample (sampling: prefill, KV cache and decode loop) ") for line in out
  )
  assert any(line.startswith("eval (greedy decoding of the evaluation, refilled") for line in out)
  for method in ("rft", "dpo", "kto", "rloo"):
    config.method = method
    r = aot.compile_step(config, "v4-8")
    assert r["method"] == method and r["value_params"] == 0 and r["peak"] > 0
    rows = 2 if method in ("dpo", "kto") else 1
    assert r["batch"] == rows * config.train.batch_size


def test_pallas_flash_attention_compiles_into_the_step_for_tpu():
  config = _arith_tiny()  # 127 tokens fed: padded to the kernel's 128-token blocks
  config.model.update(attention="pallas_tpu")
  r = aot.compile_step(config, "v5e-8")
  assert r["attention"] == "pallas_tpu" and r["pallas_kernels"] > 0
  config.model.update(attention="xla")
  assert aot.compile_step(config, "v5e-8")["pallas_kernels"] == 0


def test_command_line_reports_a_bad_topology_in_one_line():
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "dqo_jax.main",
          "--config=configs/arith.py:tiny",
          "--compile_only",
          "--topology=v5p-17",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --topology='v5p-17'"), proc.stderr
