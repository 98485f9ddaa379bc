"""Stage `eval`: greedy test accuracy of the SFT checkpoint and of the trained method's policy,
overall and per step count. DIR/results.json gathers every method evaluated in the workdir."""

from __future__ import annotations

import json
import os

from dqo_jax.metrics import ScalarWriter, write_json_atomic
from dqo_jax.stages.context import Context, run_name
from dqo_jax.stages.monitor import greedy_accuracy
from dqo_jax.stages.train import trained_policy_params

RESULT_FILE = "result.json"


def _evaluate(ctx: Context, name: str, params_fn) -> dict:
  """The accuracy of `name`, computed once per workdir and kept in DIR/eval/<name>/."""
  out_dir = os.path.join(ctx.workdir, "eval", name)
  path = os.path.join(out_dir, RESULT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = greedy_accuracy(ctx, params_fn(), ctx.config.eval.num_examples, desc=f"eval {name}")
  os.makedirs(out_dir, exist_ok=True)
  writer = ScalarWriter(out_dir)
  writer.write(
      0,
      {
          "accuracy": result["accuracy"],
          **{f"accuracy_steps_{k}": v for k, v in result["by_steps"].items()},
      },
  )
  writer.close()
  write_json_atomic(path, result)
  return result


def run(ctx: Context) -> dict:
  name = run_name(ctx.config)
  results = {
      "sft": _evaluate(ctx, "sft", ctx.sft_params),
      name: _evaluate(ctx, name, lambda: trained_policy_params(ctx)),
  }
  results_file = os.path.join(ctx.workdir, "results.json")
  merged = {}
  if os.path.exists(results_file):
    with open(results_file) as f:
      merged = json.load(f)
  merged.update(results)
  write_json_atomic(results_file, merged)
  return results


def format_table(results: dict) -> str:
  """A plain-text table: one row per method, overall accuracy and accuracy per step count."""
  steps = sorted({k for r in results.values() for k in r["by_steps"]}, key=int)
  header = ["method", "accuracy"] + [f"{s} steps" for s in steps]
  rows = [
      [name, f"{r['accuracy']:.3f}"] + [f"{r['by_steps'].get(s, float('nan')):.3f}" for s in steps]
      for name, r in results.items()
  ]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
