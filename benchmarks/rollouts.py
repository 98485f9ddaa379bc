"""The rollouts stage and the sample stage: today's batching against shared prefixes and
length-ordered batches, on a trained model's own samples.

    python -m benchmarks.rollouts [--quick] [--workdir=DIR]

Random weights would not do here: how long a completion runs is what the new paths exploit, so
each model is first trained by the pipeline (`configs/arith.py`, SFT for a few hundred steps,
then its sample stage), in `--workdir` (kept, and reused by the next run) or a temporary
directory. The rows then time, side by side on the same prefixes and weights:
- rollouts (`dqo_jax.stages.rollouts.sample_rollouts`): every distinct prefix of the offline
  samples, `dqo.process.rollouts_per_step` = 4 completions each, as the stage makes them.
  Today's path prefills each completion's prefix anew and batches prefixes in the order they
  are found; the new one prefills a prefix once for its 4 completions (`samples_per_prompt`)
  and orders prefixes by how long their sample went on;
- sampling K = 4 responses per prompt (`dqo_jax.generation.generate_all`), prompts repeated K
  times against one prefill per prompt.
Random draws differ between the paths (the distribution does not: tests/test_sampler.py), so a
row reports generated tokens per second and wall seconds for the same work.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from benchmarks.timing import interleaved, median_ratio, row
from configs import arith
from dqo_jax import rng
from dqo_jax.generation import generate_all
from dqo_jax.main import run_pipeline
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import build_context
from dqo_jax.stages.rollouts import distinct_prefixes, sample_rollouts
from dqo_jax.workdir import open_workdir

# The embedded model, and a larger one that still trains in minutes on a CPU.
SIZES = dict(
    embedded=dict(),
    large=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536),
)
K = M = 4


def _config(size: str, quick: bool):
  c = arith.get_config()
  c.model.update(SIZES[size])
  c.stages = "sft,sample"
  c.sft.steps = 300 if quick else 600
  c.eval.update(every=c.sft.steps, monitor_examples=50)
  c.sample.num_prompts = 16 if quick else 64
  return c


def _workload(size: str, quick: bool, root: str):
  """A trained model of `size`, its context and its offline samples (trained on first use)."""
  config = _config(size, quick)
  workdir = os.path.join(root, f"{size}{'_quick' if quick else ''}")
  run_pipeline(config, workdir)
  ctx = build_context(config, open_workdir(workdir))
  return ctx, ctx.sft_params(), artifacts.read_samples(ctx)


def _rows_for(size: str, quick: bool, root: str) -> list[dict]:
  ctx, params, records = _workload(size, quick, root)
  c, repeats = ctx.config, 1 if quick else 3
  common = dict(
      tok=ctx.tokenizer,
      mesh=ctx.mesh,
      max_new_tokens=c.data.max_response_len,
      temperature=c.sample.temperature,
  )
  _, _, prefixes, tokens, mask, remaining = distinct_prefixes(ctx, records)
  outputs = {}

  def rollouts(shared: bool, by_length: bool, trim: bool):
    def fn():
      s = sample_rollouts(
          ctx.policy_model,
          params,
          tokens,
          mask,
          remaining,
          M,
          rng.key(0, "rollouts"),
          shared_prefix=shared,
          by_length=by_length,
          trim=trim,
          batch_size=c.dqo.process.batch_size,
          **common,
      )
      outputs[(shared, by_length, trim)] = s
      return s.tokens

    return fn

  ways = {
      "today": (False, False, False),
      "shared": (True, False, False),
      "shared+ordered": (True, True, False),
      "shared+ordered+trimmed": (True, True, True),
  }
  t = interleaved({name: rollouts(*w) for name, w in ways.items()}, repeats)
  generated = {name: int(outputs[w].lengths.sum()) for name, w in ways.items()}
  model_note = (
      f"{size} model ({ctx.model_cfg.n_layers} layers, d_model {ctx.model_cfg.d_model}) after "
      f"{c.sft.steps} SFT steps; {len(prefixes)} distinct prefixes of {len(records)} samples x "
      f"{M} rollouts, batch {c.dqo.process.batch_size} rows, float32 CPU, median of {repeats}"
  )
  rows = []
  for name in list(ways)[1:]:
    med = float(np.median(t[name]))
    rows.append(
        row(
            f"rollouts stage, {name} vs today ({size})",
            generated[name] / med,
            baseline=generated["today"] / float(np.median(t["today"])),
            ratio=median_ratio(t["today"], t[name]),
            target=3.0 if name == "shared+ordered+trimmed" else None,
            at_least=True,
            unit="generated tokens/s; ratio: wall time, today / new",
            notes=f"{model_note}; wall {med:.1f} s vs {np.median(t['today']):.1f} s",
        )
    )

  n = 64 if quick else 512
  prompts = ctx.rl_prompts.arrays["prompt"][:n], ctx.rl_prompts.arrays["prompt_mask"][:n]
  sampled = {}

  def sample(k: int):
    # Today: each prompt repeated K times, every batch at the full width.
    rows_, width = np.repeat(np.arange(n), K // k), 16 if k > 1 else 0

    def fn():
      s = generate_all(
          ctx.policy_model,
          params,
          prompts[0][rows_],
          prompts[1][rows_],
          rng.key(0, "sample"),
          batch_size=c.sample.batch_size,
          samples_per_prompt=k,
          width_multiple=width,
          **common,
      )
      sampled[k] = s
      return s.tokens

    return fn

  t = interleaved({"repeated": sample(1), "shared": sample(K)}, repeats)
  tps = {
      k: int(sampled[k].lengths.sum()) / float(np.median(t[name]))
      for k, name in ((1, "repeated"), (K, "shared"))
  }
  rows.append(
      row(
          f"sample stage K={K}, one prefill per prompt, trimmed width vs today ({size})",
          tps[K],
          baseline=tps[1],
          ratio=tps[K] / tps[1],
          target=1.5,
          at_least=True,
          unit="generated tokens/s",
          notes=(
              f"{n} prompts x {K}, batch {c.sample.batch_size} rows, response lengths "
              f"{int(np.percentile(sampled[K].lengths, 10))}-"
              f"{int(np.percentile(sampled[K].lengths, 90))} (10th-90th percentile); "
              f"{model_note.split(';')[0]}, median of {repeats}"
          ),
      )
  )
  return rows


def rows(quick: bool, root: str = "", sizes=None) -> list[dict]:
  sizes = sizes or (("embedded",) if quick else tuple(SIZES))
  if root:
    return [r for s in sizes for r in _rows_for(s, quick, root)]
  with tempfile.TemporaryDirectory() as tmp:
    return [r for s in sizes for r in _rows_for(s, quick, tmp)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--workdir", default="", help="where the trained models are kept")
  parser.add_argument("--sizes", default="", help="comma-separated: embedded,large")
  args = parser.parse_args()
  sizes = tuple(s for s in args.sizes.split(",") if s) or None
  from benchmarks.run import markdown

  print(markdown(rows(args.quick, args.workdir, sizes)))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main()
