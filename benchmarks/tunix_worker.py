"""Tunix's side of `benchmarks.sampler`, run in the Tunix environment as a subprocess.

Tunix 0.1.7 pins transformers 5.12.1 (ours is newer), so it lives in its own venv and this
script imports nothing from dqo_jax. Protocol, one JSON object a line: the first stdin line is
the spec (weights directory, and the shapes of the runs it names: "sample", "sample_k",
"dpo"); each later line names one of them, answered by one
stdout line `RESULT {...}` with the seconds one run took (warm-up runs are the parent's to drop).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tunix.generate import sampler as tunix_sampler
from tunix.models.llama3 import model as llama
from tunix.models.llama3 import params as llama_params
from tunix.sft.dpo import dpo_trainer


class _Tokens:
  """A tokenizer over strings of space-separated token ids: the prompts are ids already."""

  def __init__(self, pad_id: int, eos_id: int):
    self._pad, self._eos = pad_id, eos_id

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self):
    return None  # no BOS: the prompts are used as given

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return self._pad


def _model(spec):
  hf = spec["hf_config"]
  cfg = llama.ModelConfig(
      num_layers=hf["num_hidden_layers"],
      vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"],
      head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"],
      rope_theta=hf["rope_theta"],
      norm_eps=hf["rms_norm_eps"],
      weight_tying=hf["tie_word_embeddings"],
  )
  return llama_params.create_model_from_safe_tensors(spec["weights"], cfg, dtype=jnp.float32)


def _sampler(spec):
  hf, s = spec["hf_config"], spec["sample"]
  prompts = [" ".join(map(str, p)) for p in s["prompts"]]
  p, r = s["prompt_len"], s["new_tokens"]
  sampler = tunix_sampler.Sampler(
      _model(spec),
      _Tokens(s["pad_id"], s["eos_id"]),
      tunix_sampler.CacheConfig(
          cache_size=p + r,
          num_layers=hf["num_hidden_layers"],
          num_kv_heads=hf["num_key_value_heads"],
          head_dim=hf["head_dim"],
      ),
  )

  def run():
    out = sampler(prompts, max_generation_steps=r, max_prompt_length=p, eos_tokens=[s["eos_id"]])
    return [np.asarray(t).tolist() for t in out.tokens]

  return run


def _sampler_k(spec):
  """Sampling at a temperature, the prompts (each repeated K times by the parent) in batches of
  `batch` rows, each batch decoded until its rows reach an end token or the length limit."""
  hf, s = spec["hf_config"], spec["sample_k"]
  prompts = [" ".join(map(str, p)) for p in s["prompts"]]
  p, r, batch = s["prompt_len"], s["new_tokens"], s["batch"]
  sampler = tunix_sampler.Sampler(
      _model(spec),
      _Tokens(s["pad_id"], s["eos_ids"][0]),
      tunix_sampler.CacheConfig(
          cache_size=p + r,
          num_layers=hf["num_hidden_layers"],
          num_kv_heads=hf["num_key_value_heads"],
          head_dim=hf["head_dim"],
      ),
  )
  calls = [0]

  def run():
    calls[0] += 1
    out = []
    for i in range(0, len(prompts), batch):
      got = sampler(
          prompts[i : i + batch],
          max_generation_steps=r,
          max_prompt_length=p,
          eos_tokens=s["eos_ids"],
          temperature=s["temperature"],
          seed=calls[0] * len(prompts) + i,
      )
      out += [np.asarray(t).tolist() for t in got.tokens]
    return out

  return run


def _dpo(spec):
  d = spec["dpo"]
  trainer = dpo_trainer.DPOTrainer(
      model=_model(spec),
      ref_model=_model(spec),
      optimizer=optax.adamw(d["lr"]),
      training_config=dpo_trainer.DPOTrainingConfig(
          eval_every_n_steps=1 << 30, beta=d["beta"], pbar_description=None
      ),
  )
  # The reference log-probs are computed here, once, as our offline batches carry them.
  example = trainer._prepare_inputs(  # pylint: disable=protected-access
      dpo_trainer.TrainingInput(**{k: jnp.asarray(v) for k, v in d["batch"].items()})
  )
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

  def run():
    loss, _, _ = train_step(example)
    return float(jax.block_until_ready(loss))

  return run


def main() -> int:
  spec = json.loads(sys.stdin.readline())
  makers = {"sample": _sampler, "sample_k": _sampler_k, "dpo": _dpo}
  runs = {name: make(spec) for name, make in makers.items() if name in spec}
  print("RESULT " + json.dumps({"ready": True, "jax": jax.__version__}), flush=True)
  for line in sys.stdin:
    name = line.strip()
    start = time.perf_counter()
    out = runs[name]()
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"seconds": seconds, "out": out}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
