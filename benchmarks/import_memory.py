"""Peak host memory of importing a Hugging Face checkpoint, against the largest tensor and the
model's own footprint.

    python -m benchmarks.import_memory --dir /tmp/llama_1b          # writes it first if absent
    python -m benchmarks.import_memory --dir /tmp/llama_1b --dtype float32

Writes a random Llama-layout model of 1.1B parameters (TinyLlama's shape: 22 layers, d_model
2048, vocabulary 32000, untied head) as bfloat16 safetensors shards with an index, tensor by
tensor with numpy (no transformers), then imports it in a fresh process with
`dqo_jax.convert.import_hf` and reads the process's peak resident set (VmHWM). On the CPU
backend the imported parameters live in host memory, so the peak includes the model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
)


def hf_tensors(c):
  """(name, shape) of a Llama checkpoint, in Hugging Face layout."""
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
  yield "model.embed_tokens.weight", (v, d)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", (d,)
    yield p + "post_attention_layernorm.weight", (d,)
    yield p + "self_attn.q_proj.weight", (q, d)
    yield p + "self_attn.k_proj.weight", (kv, d)
    yield p + "self_attn.v_proj.weight", (kv, d)
    yield p + "self_attn.o_proj.weight", (d, q)
    yield p + "mlp.gate_proj.weight", (f, d)
    yield p + "mlp.up_proj.weight", (f, d)
    yield p + "mlp.down_proj.weight", (d, f)
  yield "model.norm.weight", (d,)
  yield "lm_head.weight", (v, d)


def write_model(directory: str) -> None:
  from dqo_jax import safetensors_io  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def produce(shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 0.02
    return x.astype(bf16)

  specs = [(n, s, bf16, lambda s=s: produce(s)) for n, s in hf_tensors(SHAPE)]
  safetensors_io.write_checkpoint(directory, specs, max_shard_bytes=1 << 30)
  config = dict(
      SHAPE,
      model_type="llama",
      architectures=["LlamaForCausalLM"],
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      max_position_embeddings=2048,
      torch_dtype="bfloat16",
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def measure(directory: str, dtype: str) -> dict:
  """Runs in the child process: import, then report the peak resident set."""
  import jax  # pylint: disable=g-import-not-at-top

  from dqo_jax import convert, safetensors_io  # pylint: disable=g-import-not-at-top

  jax.devices()  # start the backend before the baseline
  baseline = _status("VmRSS")
  files = safetensors_io.checkpoint_files(directory)
  largest = max(
      (int(np.prod(f.shape(n))) * f.dtype(n).itemsize, n)
      for n, f in safetensors_io.iter_tensors(files)
  )
  on_disk = sum(os.path.getsize(p) for p in set(files.values()))
  cfg, params = convert.import_hf(directory, dtype=dtype)
  leaves = jax.tree.leaves(
      jax.tree.map(lambda b: b.value, params, is_leaf=lambda x: hasattr(x, "value"))
  )
  footprint = sum(x.nbytes for x in leaves)
  largest_elems = largest[0] // 2  # the files are bf16
  peak = _status("VmHWM")
  return dict(
      params=sum(x.size for x in leaves),
      dtype=dtype,
      checkpoint_bytes=on_disk,
      footprint_bytes=footprint,
      largest_tensor=largest[1],
      largest_tensor_bytes_in_dtype=largest_elems
      * np.dtype(dtype if dtype != "bfloat16" else ml_dtypes.bfloat16).itemsize,
      baseline_rss_bytes=baseline,
      peak_rss_bytes=peak,
      peak_over_baseline_bytes=peak - baseline,
      overhead_over_footprint_bytes=peak - baseline - footprint,
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", default="/tmp/dqo_llama_1b")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.dir, args.dtype)))
    return
  if not os.path.isfile(os.path.join(args.dir, "config.json")):
    print(f"writing a random 1.1B-parameter Llama checkpoint (bf16) to {args.dir} ...")
    write_model(args.dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.import_memory",
          "--dir",
          args.dir,
          "--dtype",
          args.dtype,
          "--child",
      ],
      env=env,
      check=True,
      capture_output=True,
      text=True,
  )
  r = json.loads(out.stdout.strip().splitlines()[-1])
  gib = lambda b: f"{b / (1 << 30):.2f} GiB"
  print(f"parameters            {r['params'] / 1e9:.3f}B imported as {r['dtype']}")
  print(f"checkpoint on disk    {gib(r['checkpoint_bytes'])} (bf16)")
  print(f"model footprint       {gib(r['footprint_bytes'])}")
  print(f"largest tensor        {gib(r['largest_tensor_bytes_in_dtype'])} ({r['largest_tensor']})")
  print(f"RSS before import     {gib(r['baseline_rss_bytes'])} (Python, JAX)")
  print(f"peak RSS              {gib(r['peak_rss_bytes'])}")
  print(f"peak - before         {gib(r['peak_over_baseline_bytes'])}")
  print(f"  - footprint         {gib(r['overhead_over_footprint_bytes'])}")


if __name__ == "__main__":
  main()
