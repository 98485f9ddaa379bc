"""Stage `eval`: greedy test accuracy of the SFT checkpoint and of the trained method's policy,
overall and per step count, and with `eval.samples_per_problem` = k > 0 the accuracy of
temperature samples, pass@k and maj@k. DIR/results.json gathers every method evaluated in the
workdir."""

from __future__ import annotations

import json
import os

from dqo_jax.errors import UserError
from dqo_jax.metrics import ScalarWriter, write_json_atomic
from dqo_jax.stages.context import Context, run_name
from dqo_jax.stages.monitor import greedy_accuracy, sampled_accuracy
from dqo_jax.stages.train import trained_policy_params

RESULT_FILE = "result.json"


def _evaluate(ctx: Context, name: str, params_fn) -> dict:
  """The accuracy of `name`, computed once per workdir and kept in DIR/eval/<name>/."""
  out_dir = os.path.join(ctx.workdir, "eval", name)
  path = os.path.join(out_dir, RESULT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  cfg = ctx.config.eval
  params = params_fn()
  result = greedy_accuracy(ctx, params, cfg.num_examples, desc=f"eval {name}")
  if cfg.samples_per_problem > 0:
    result["sampled"] = sampled_accuracy(
        ctx, params, cfg.samples_per_problem, cfg.num_examples, desc=f"sample {name}"
    )
  os.makedirs(out_dir, exist_ok=True)
  writer = ScalarWriter(out_dir)
  writer.write(
      0,
      {
          "accuracy": result["accuracy"],
          **{f"accuracy_steps_{k}": v for k, v in result["by_steps"].items()},
          **{f"sampled_{k}": v for k, v in result.get("sampled", {}).items() if k != "k"},
      },
  )
  writer.close()
  write_json_atomic(path, result)
  return result


def skipped_updates(ctx: Context, run: str) -> int | None:
  """How many updates the training run `run` ('sft' or a method's) skipped as non-finite, from
  its DONE.json (None from one written by an older version). UserError when it has none: a run
  that has not finished, or that the non-finite guard stopped, is not evaluated."""
  path = os.path.join(ctx.workdir, run, "DONE.json")
  if not os.path.exists(path):
    stage = "sft" if run == "sft" else "train"
    raise UserError(
        f"{path} not found: the {run!r} run has not finished training, so there is nothing to "
        f"evaluate; run the {stage!r} stage first"
    )
  with open(path) as f:
    return json.load(f)["summary"].get("skipped_updates")


def run(ctx: Context) -> dict:
  name = run_name(ctx.config)
  skipped = {r: skipped_updates(ctx, r) for r in ("sft", name)}
  results = {
      "sft": _evaluate(ctx, "sft", ctx.sft_params),
      name: _evaluate(ctx, name, lambda: trained_policy_params(ctx)),
  }
  results = {r: dict(result, skipped_updates=skipped[r]) for r, result in results.items()}
  results_file = os.path.join(ctx.workdir, "results.json")
  merged = {}
  if os.path.exists(results_file):
    with open(results_file) as f:
      merged = json.load(f)
  merged.update(results)
  write_json_atomic(results_file, merged)
  return results


def format_table(results: dict) -> str:
  """A plain-text table: one row per method, greedy accuracy overall and per step count, and
  the sampled figures where they were measured."""
  steps = sorted({k for r in results.values() for k in r["by_steps"]}, key=int)
  k = next((r["sampled"]["k"] for r in results.values() if "sampled" in r), None)
  sampled = [] if k is None else ["sampled", f"pass@{k}", f"maj@{k}"]
  header = ["method", "greedy"] + [f"{s} steps" for s in steps] + sampled
  fmt_value = lambda v: "-" if v is None else f"{v:.3f}"
  rows = [
      [name, fmt_value(r["accuracy"])]
      + [fmt_value(r["by_steps"].get(s)) for s in steps]
      + [
          fmt_value(r.get("sampled", {}).get(key))
          for key in ("accuracy", "pass_at_k", "maj_at_k")[: len(sampled)]
      ]
      for name, r in results.items()
  ]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
