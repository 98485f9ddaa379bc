"""The rollouts stage, the sample stage and greedy decoding: today's batching against shared
prefixes, length-ordered and trimmed batches, and refilled decode slots, on a trained model's own
samples.

    python -m benchmarks.rollouts [--quick] [--workdir=DIR] [--sizes=embedded,large]

Random weights would not do here: how long a completion runs is what the new paths exploit, so
each model is first trained by the pipeline (`configs/arith.py`, SFT for a few hundred steps,
then its sample stage), in `--workdir` (kept, and reused by the next run) or a temporary
directory. The rows then time, side by side on the same prompts and weights:
- rollouts (`dqo_jax.stages.rollouts.sample_rollouts`): every distinct prefix of the offline
  samples, M = 4 completions each. Today's path prefills each completion's prefix anew and
  batches prefixes in the order they are found; then one prefill per prefix for its M
  completions (`samples_per_prompt`), prefixes ordered by how long their sample went on, batches
  trimmed of all-padding columns, and refilled decode slots (`refill_rows`);
- sampling K = 4 responses per prompt (`dqo_jax.generation.generate_all`): prompts repeated K
  times at the full width (today) against one prefill per prompt with trimmed widths (the
  default) and refilled slots (`sample.refill_rows`);
- greedy decoding (the eval stage's): batches against refilled slots, whose tokens must agree.
Random draws differ between the sampling paths (the distribution does not: tests/test_sampler.py),
so a row reports generated tokens per second and the wall-time ratio for the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks import sampler as sampler_bench
from benchmarks.timing import interleaved, median_ratio, row
from configs import arith
from dqo_jax import convert, rng
from dqo_jax.generation import generate_all
from dqo_jax.main import run_pipeline
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import build_context
from dqo_jax.stages.rollouts import distinct_prefixes, sample_rollouts
from dqo_jax.workdir import open_workdir

# The embedded model, and a larger one that still trains in minutes on a CPU; "tunix" is the
# embedded model as Tunix's Llama3 computes it (its rotary base is always 1e6; untied head), for
# the row against Tunix's sampler alone.
SIZES = dict(
    embedded=dict(),
    large=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536),
    tunix=dict(rope_theta=1e6, tie_embeddings=False),
)
K = M = 4
REFILL = 32  # rows refilled at a time


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


def _compare(ways: dict, repeats: int, label: str, target_way: str, target: float, note: str):
  """Times every way of doing the same work (zero-argument functions returning Samples) side
  by side; a row per way against the first ("today"): generated tokens/s and the wall ratio."""
  out = {}

  def timed(name, fn):
    def run():
      out[name] = fn()
      return out[name].tokens

    return run

  t = interleaved({name: timed(name, fn) for name, fn in ways.items()}, repeats)
  today = list(ways)[0]
  wall = {name: float(np.median(v)) for name, v in t.items()}
  tps = {name: int(out[name].lengths.sum()) / wall[name] for name in ways}
  return [
      row(
          f"{label}, {name} vs {today}",
          tps[name],
          baseline=tps[today],
          ratio=median_ratio(t[today], t[name]),
          target=target if name == target_way else None,
          at_least=True,
          unit="generated tokens/s; ratio: wall time, today / new",
          notes=f"{note}; wall {wall[name]:.2f} s vs {wall[today]:.2f} s, median of {repeats}",
      )
      for name in list(ways)[1:]
  ]


def _tunix_rows(quick: bool, root: str) -> list[dict]:
  """Sampling K = 4 responses per prompt at the sample stage's temperature: ours (one prefill per
  prompt, refilled slots) against Tunix's Sampler given each prompt K times in batches of the
  same rows, on the same trained weights (exported as a Hugging Face checkpoint, which Tunix
  reads). Tunix's seconds are its worker's own, without the round trip to it."""
  ctx, params, _ = _workload("tunix", quick, root)
  c, repeats = ctx.config, 1 if quick else 3
  n = 64 if quick else 128
  prompt = ctx.rl_prompts.arrays["prompt"][:n]
  prompt_mask = ctx.rl_prompts.arrays["prompt_mask"][:n]
  r, tok = c.data.max_response_len, ctx.tokenizer
  note = (
      f"embedded model with rope_theta 1e6, untied, after {c.sft.steps} SFT steps, float32 CPU; "
      f"{n} prompts x {K} at temperature {c.sample.temperature}, up to {r} new tokens, batch "
      f"{c.sample.batch_size} rows"
  )
  name = f"sample stage K={K}, ours (shared+refilled) vs Tunix Sampler"
  if not os.path.exists(sampler_bench.TUNIX_PYTHON):
    why = f"Tunix not run: no python at TUNIX_PYTHON ({sampler_bench.DEFAULT_TUNIX_PYTHON})"
    return [row(name, None, unit="generated tokens/s", notes=f"{note}; {why}")]

  def ours():
    return generate_all(
        ctx.policy_model,
        params,
        prompt,
        prompt_mask,
        rng.key(0, "sample"),
        batch_size=c.sample.batch_size,
        samples_per_prompt=K,
        refill_rows=REFILL,
        temperature=c.sample.temperature,
        tok=tok,
        mesh=ctx.mesh,
        max_new_tokens=r,
    )

  with tempfile.TemporaryDirectory() as directory:
    convert.export_hf(
        params, ctx.model_cfg, directory, dtype="float32", base_config=dict(pad_token_id=tok.pad_id)
    )
    prompts = [list(map(int, q[m.astype(bool)])) for q, m in zip(prompt, prompt_mask)]
    spec = dict(
        weights=directory,
        hf_config=json.load(open(os.path.join(directory, "config.json"))),
        sample_k=dict(
            prompts=[q for q in prompts for _ in range(K)],
            prompt_len=prompt.shape[1],
            new_tokens=r,
            pad_id=tok.pad_id,
            eos_ids=list(tok.stop_ids),
            temperature=float(c.sample.temperature),
            batch=int(c.sample.batch_size),
        ),
    )
    tunix = sampler_bench.TunixWorker(spec)
    try:
      ours(), tunix.run("sample_k")  # warm-up: compilation
      seconds, tokens = {"ours": [], "tunix": []}, {}
      for _ in range(repeats):
        start = time.perf_counter()
        s = ours()
        seconds["ours"].append(time.perf_counter() - start)
        tokens["ours"] = int(s.lengths.sum())
        t, out = tunix.run("sample_k")
        seconds["tunix"].append(t)
        # Tunix returns each row up to its end token; ours counts the end token as generated.
        tokens["tunix"] = sum(len(x) + (len(x) < r) for x in out)
    finally:
      tunix.close()
  wall = {k: float(np.median(v)) for k, v in seconds.items()}
  tps = {k: tokens[k] / wall[k] for k in wall}
  return [
      row(
          name,
          tps["ours"],
          baseline=tps["tunix"],
          ratio=tps["ours"] / tps["tunix"],
          target=2.0,
          at_least=True,
          unit="generated tokens/s",
          notes=(
              f"{note}; google-tunix 0.1.7 in its own venv; wall {wall['ours']:.2f} s vs "
              f"{wall['tunix']:.2f} s, median of {repeats}; mean response {tokens['ours'] / (n * K):.1f} "
              f"tokens (ours) vs {tokens['tunix'] / (n * K):.1f} (Tunix), the same model's "
              "distribution drawn twice"
          ),
      )
  ]


def _rows_for(size: str, quick: bool, root: str) -> list[dict]:
  if size == "tunix":
    return _tunix_rows(quick, root)
  ctx, params, records = _workload(size, quick, root)
  c, repeats = ctx.config, 1 if quick else 3
  # The larger model decodes about 6x slower here: a quarter of the work keeps its rows minutes.
  share = 4 if size == "large" and not quick else 1
  records = records[: len(records) // share]
  common = dict(tok=ctx.tokenizer, mesh=ctx.mesh, max_new_tokens=c.data.max_response_len)
  _, _, prefixes, tokens, mask, remaining = distinct_prefixes(ctx, records)
  model_note = (
      f"{size} model ({ctx.model_cfg.n_layers} layers, d_model {ctx.model_cfg.d_model}) after "
      f"{c.sft.steps} SFT steps, float32 CPU"
  )

  def rollouts(shared, by_length, trim, refill=0):
    return lambda: sample_rollouts(
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
        refill_rows=refill,
        batch_size=c.dqo.process.batch_size,
        **common,
    )

  out = _compare(
      {
          "today": rollouts(False, False, False),
          "shared": rollouts(True, False, False),
          "shared+ordered": rollouts(True, True, False),
          "shared+ordered+trimmed": rollouts(True, True, True),
          "refilled slots": rollouts(True, False, True, refill=REFILL),
      },
      repeats,
      f"rollouts stage ({size})",
      "refilled slots",
      3.0,
      f"{model_note}; {len(prefixes)} distinct prefixes of {len(records)} samples x {M} "
      f"rollouts, batch {c.dqo.process.batch_size} rows (refilled {REFILL} at a time)",
  )

  n = 64 if quick else 512 // share
  prompt, prompt_mask = (
      ctx.rl_prompts.arrays["prompt"][:n],
      ctx.rl_prompts.arrays["prompt_mask"][:n],
  )
  repeated = np.repeat(np.arange(n), K)

  def sample(k, width, refill=0, greedy=False, rows=None):
    rows = np.arange(n) if rows is None else rows
    return lambda: generate_all(
        ctx.policy_model,
        params,
        prompt[rows],
        prompt_mask[rows],
        rng.key(0, "sample"),
        batch_size=c.sample.batch_size,
        samples_per_prompt=k,
        width_multiple=width,
        refill_rows=refill,
        greedy=greedy,
        temperature=c.sample.temperature,
        **common,
    )

  out += _compare(
      {
          "today": sample(1, 0, rows=repeated),
          "shared+trimmed": sample(K, 16),
          "shared+refilled": sample(K, 16, refill=REFILL),
      },
      repeats,
      f"sample stage K={K} ({size})",
      "shared+refilled",
      1.5,
      f"{model_note}; {n} prompts x {K}, batch {c.sample.batch_size} rows (refilled {REFILL} "
      "at a time)",
  )
  greedy = _compare(
      {"batches": sample(1, 16, greedy=True), "refilled": sample(1, 16, REFILL, greedy=True)},
      repeats,
      f"greedy decoding ({size})",
      "",
      0.0,
      f"{model_note}; {n} prompts, batch {c.sample.batch_size} rows (refilled {REFILL} at a time)",
  )
  a, b = sample(1, 16, greedy=True)(), sample(1, 16, REFILL, greedy=True)()
  same = int((a.tokens == b.tokens).all(1).sum())
  greedy[0]["notes"] += f"; greedy tokens identical in {same}/{n} rows"
  return out + greedy


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
  parser.add_argument("--sizes", default="", help="comma-separated: embedded,large,tunix")
  args = parser.parse_args()
  sizes = tuple(s for s in args.sizes.split(",") if s) or None
  from benchmarks.run import markdown

  print(markdown(rows(args.quick, args.workdir, sizes)))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main()
