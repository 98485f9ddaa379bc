"""Stage `eval`: greedy test accuracy of the SFT and the DQO policy, overall and per step count."""

from __future__ import annotations

import os

from dqo_jax.metrics import ScalarWriter, write_json_atomic
from dqo_jax.stages.context import Context
from dqo_jax.stages.dqo import dqo_policy_params
from dqo_jax.stages.monitor import greedy_accuracy


def run(ctx: Context) -> dict:
  n = ctx.config.eval.num_examples
  results = {
      "sft": greedy_accuracy(ctx, ctx.sft_params(), n, desc="eval sft"),
      "dqo": greedy_accuracy(ctx, dqo_policy_params(ctx), n, desc="eval dqo"),
  }
  writer = ScalarWriter(ctx.stage_dir("eval"))
  for name, r in results.items():
    writer.write(
        0,
        {
            f"accuracy/{name}": r["accuracy"],
            **{f"accuracy_steps_{k}/{name}": v for k, v in r["by_steps"].items()},
        },
    )
  writer.close()
  write_json_atomic(os.path.join(ctx.workdir, "results.json"), results)
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
