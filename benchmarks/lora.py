"""The DQO step with LoRA adapters (over a float base, and over an NF4 one: QLoRA) against the
full DQO step: time, peak memory and checkpoint size, side by side on the model and batch of
`benchmarks/train_steps.py`.

Both steps come from `dqo_jax.train.build.build_train_step` (the train stage's builder), on one
device, from the same base; the adapter step also reads the frozen base (its third argument).
The checkpoint is what `fit` saves of each state (Orbax, through `dqo_jax.checkpoint`).
"""

from __future__ import annotations

import os
import statistics
import tempfile

import flax.linen as nn
import jax

from benchmarks.timing import interleaved, median_ratio, row
from benchmarks.train_steps import SIZES, VOCAB, make_batch, peak_mib
from configs.arith import get_config
from dqo_jax import sharding
from dqo_jax.checkpoint import Checkpoints
from dqo_jax.model import ModelConfig
from dqo_jax.train import build
from dqo_jax.train.loop import init_state

# name -> (what the rows call it, `config.model.lora` settings)
VARIANTS = {
    "lora16": ("LoRA rank 16", dict(rank=16)),
    # Tiles of 16 input rows: they divide every size of benchmarks/train_steps.py (d_ff 688).
    "qlora16": ("QLoRA rank 16 (NF4 base)", dict(rank=16, base_qtype="nf4", base_tile_size=16)),
}


def _config(model_kwargs: dict, batch: int, lora_settings: dict):
  c = get_config()
  c.model.update(model_kwargs)
  c.model.lora.update(lora_settings)
  c.train.batch_size = batch
  return c


def _stepper(config, base_params, batch):
  """(call, compiled step, state): the step jitted as `fit` jits it, its state carried."""
  cfg = ModelConfig.from_config(config.model, VOCAB)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  step = build.build_train_step(config, cfg, mesh)
  # As `fit` starts it: fresh buffers (the full state's two models would share the base's).
  state = init_state(step.init_fn, jax.random.key(1), step.state_shardings, (base_params,))
  base = (step.base_of(base_params),) if step.adapters else ()
  jitted = jax.jit(step.step_fn, donate_argnums=0)
  compiled = jitted.lower(state, batch, *base).compile()  # for its memory analysis
  held = dict(state=state)

  def call():
    # Through jit, not `compiled`: an AOT-compiled program on the CPU refuses the 4-bit arrays
    # of QLoRA's base in the layout the quantizing program gave them; jit lays them out.
    held["state"], metrics = jitted(held["state"], batch, *base)
    return metrics

  return call, compiled, held


def _checkpoint_mib(state) -> float:
  with tempfile.TemporaryDirectory() as d:
    ckpt = Checkpoints(d, every=1)
    ckpt.save(1, state, force=True)
    ckpt.close()
    size = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(d) for f in files
    )
  return size / 2**20


def rows(quick: bool, size: str | None = None) -> list[dict]:
  size = size or ("quick" if quick else "full")
  model_kwargs, b, p, r, repeats = SIZES[size]
  batch = make_batch(b, p, r)
  full_config = _config(model_kwargs, b, dict(rank=0))
  policy, _ = build.models(full_config, ModelConfig.from_config(full_config.model, VOCAB))
  base = nn.meta.unbox(build.boxed_init(policy, jax.random.key(0)))
  steppers = {"full": _stepper(full_config, base, batch)}
  for name, (_, settings) in VARIANTS.items():
    steppers[name] = _stepper(_config(model_kwargs, b, settings), base, batch)
  times = interleaved({name: s[0] for name, s in steppers.items()}, repeats)
  shape = (
      f"d_model {model_kwargs['d_model']}, {model_kwargs['n_layers']} layers, vocab {VOCAB}, "
      f"batch {b} x (prompt {p} + response {r})"
  )
  out = []
  full_call, full_compiled, full_held = steppers["full"]
  for name, (label, _) in VARIANTS.items():
    _, compiled, held = steppers[name]
    out.append(
        row(
            f"DQO step, {label} / full DQO step",
            statistics.median(times[name]) * 1e3,
            baseline=statistics.median(times["full"]) * 1e3,
            ratio=median_ratio(times[name], times["full"]),
            unit="ms",
            notes=f"all 7 projections adapted, alpha 16; {shape}",
        )
    )
    out.append(
        row(
            f"peak memory DQO step, {label} / full",
            peak_mib(compiled),
            baseline=peak_mib(full_compiled),
            ratio=peak_mib(compiled) / peak_mib(full_compiled),
            unit="MiB",
            notes="memory_analysis() of each compiled step; LoRA's includes the frozen base",
        )
    )
    ckpt, full_ckpt = _checkpoint_mib(held["state"]), _checkpoint_mib(full_held["state"])
    out.append(
        row(
            f"checkpoint DQO state, {label} / full",
            ckpt,
            baseline=full_ckpt,
            ratio=ckpt / full_ckpt,
            unit="MiB",
            notes="bytes Orbax writes for the state (adapters, value head, AdamW moments)",
        )
    )
  return out
