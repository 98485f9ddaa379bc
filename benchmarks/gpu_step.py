"""The DQO step of a Qwen2-1.5B-sized model in bfloat16 on one accelerator: step time, tokens/s
and MFU, with the sampler's generated tokens/s beside them.

    python -m benchmarks.gpu_step [--size=qwen2_1_5b|tiny] [--batch=8] [--prompt=256]
        [--response=768] [--steps=5] [--peak_tflops=N]

Random weights of the architecture of `configs/gsm8k.py:SIZE` (its built-in config; nothing is
downloaded), the step that the train stage runs (`dqo_jax.train.build.build_train_step`, jitted
by `jit_step` over a mesh of the local devices, state donated), fed offline batches of random
tokens with response lengths spread between half and all of `--response`. The layers are
unrolled here so that XLA's cost analysis of the compiled step counts every layer: MFU is that
count over (step seconds x the chip's peak bf16 FLOP/s), which `--peak_tflops` sets where the
device is not in PEAK_TFLOPS. The sampler row decodes `--batch` x 8 prompts of `--prompt` tokens
for `--response` new tokens (greedy, no end token, so every row decodes them all).
`--size=tiny` runs the same code on a CPU in seconds (what tests/test_benchmarks.py does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import arith, gsm8k
from dqo_jax import aot, methods, sharding
from dqo_jax.data.offline import offline_arrays
from dqo_jax.data.views import process_arrays
from dqo_jax.model import ModelConfig
from dqo_jax.sampler import generate
from dqo_jax.train import build
from dqo_jax.train.loop import init_state, jit_step

# Dense bfloat16 peak per device, by `device_kind` prefix.
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}


def _config(size: str, batch: int, prompt: int, response: int):
  c = arith.get_config("tiny") if size == "tiny" else gsm8k.get_config(size)
  c.data.update(max_prompt_len=prompt, max_response_len=response)
  c.train.batch_size = batch
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.model.update(remat="full", scan_layers=False)
  return c


def _model_cfg(config) -> ModelConfig:
  if config.model.get("hf_repo"):
    return aot.model_config(config)
  return ModelConfig.from_config(config.model, 256)


def _batch(config, vocab: int, rng) -> dict[str, np.ndarray]:
  """A full training batch of random samples, as the sample stage's records would make it."""
  d, t = config.data, config.train
  rows = int(t.batch_size) * methods.of(config).rows_per_example
  records = []
  for _ in range(rows):
    n = int(rng.integers(d.max_response_len // 2, d.max_response_len + 1))
    records.append(
        dict(
            prompt=rng.integers(3, vocab, d.max_prompt_len).tolist(),
            response=rng.integers(3, vocab, n).tolist(),
            behaviour_logprobs=(-rng.exponential(1.0, n)).tolist(),
            ref_logprobs=(-rng.exponential(1.0, n)).tolist(),
            reward=float(rng.integers(0, 2)),
            correct=False,
            finish="eos",
        )
    )
  arrays = offline_arrays(records, d, pad_id=0)
  if methods.of(config).needs_rollouts(config):
    potentials = [dict(boundaries=[], potentials=[0.0])] * rows
    arrays.update(process_arrays(potentials, arrays["response_len"], d.max_response_len))
  return arrays


def _median_seconds(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # compilation
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(size: str, batch: int, prompt: int, response: int, steps: int, peak_tflops: float = 0):
  config = _config(size, batch, prompt, response)
  model_cfg = _model_cfg(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = sharding.logical_rules(config.mesh)
  built = build.build_train_step(config, model_cfg, mesh)
  key = jax.random.key(0)
  sft = init_state(lambda r: build.boxed_init(built.policy_model, r), key, built.plain_shardings)
  state = [init_state(built.init_fn, key, built.state_shardings, (sft,))]
  step = jit_step(built.step_fn, built.state_shardings, mesh, rules)
  data = jax.device_put(
      _batch(config, model_cfg.vocab_size, np.random.default_rng(0)),
      sharding.batch_sharding(mesh),
  )
  compiled = step.lower(state[0], data).compile()
  flops = float(compiled.cost_analysis()["flops"])

  def train_step():
    state[0], metrics = compiled(state[0], data)
    return metrics

  step_s = _median_seconds(train_step, steps)
  device = mesh.devices.flat[0]
  peak = peak_tflops or next(
      (v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), 0.0
  )
  tokens = int(data["prompt"].shape[0]) * (prompt + response)
  prompts = np.random.default_rng(1).integers(3, model_cfg.vocab_size, (8 * batch, prompt))
  prompts = jnp.asarray(prompts, jnp.int32)

  def sample():
    return generate(
        built.policy_model,
        sft,
        prompts,
        jnp.ones_like(prompts),
        jax.random.key(2),
        max_new_tokens=response,
        eos_id=-1,  # never generated: every row decodes `response` tokens
        pad_id=0,
        greedy=True,
    ).tokens

  sample_s = _median_seconds(sample, max(1, steps // 2))
  return dict(
      device=device.device_kind,
      model=f"{size}: {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, vocab "
      f"{model_cfg.vocab_size}, compute {model_cfg.dtype}",
      batch=f"{data['prompt'].shape[0]} rows x ({prompt} prompt + {response} response)",
      step_s=step_s,
      train_tokens_per_s=tokens / step_s,
      flops_per_step=flops,
      mfu=flops / (step_s * peak * 1e12) if peak else None,  # both per device
      peak_tflops=peak or None,
      sample_tokens_per_s=8 * batch * response / sample_s,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="qwen2_1_5b", help="a configs/gsm8k.py preset, or tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--response", type=int, default=768)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="per device, dense bf16")
  args = parser.parse_args()
  r = run(args.size, args.batch, args.prompt, args.response, args.steps, args.peak_tflops)
  for k, v in r.items():
    print(f"{k:22s} {v:,.4g}" if isinstance(v, float) else f"{k:22s} {v}")


if __name__ == "__main__":
  main()
