"""Stage `eval`: greedy test accuracy of the SFT checkpoint and of the trained method's policy,
overall and per step count, and with `eval.samples_per_problem` = k > 0 the accuracy of
temperature samples, pass@k and maj@k; the same on the validation split (`validation`), on which
settings are chosen; and the objective E[R] - beta KL(pi || pi_ref) of fresh samples on training
and test prompts (`objective`: pi_ref is the SFT policy, so its KL is 0). DIR/results.json
gathers every method evaluated in the workdir."""

from __future__ import annotations

import functools
import json
import os


from dqo_jax import methods, rng
from dqo_jax.errors import UserError
from dqo_jax.metrics import ScalarWriter, write_json_atomic
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import Context
from dqo_jax.stages.measure import greedy_accuracy, sampled_accuracy, sampled_objective

RESULT_FILE = "result.json"


def _accuracies(ctx: Context, params, name: str, split: str) -> dict:
  cfg = ctx.config.eval
  result = greedy_accuracy(ctx, params, cfg.num_examples, desc=f"{split} {name}", split=split)
  if cfg.samples_per_problem > 0:
    result["sampled"] = sampled_accuracy(
        ctx, params, cfg.samples_per_problem, cfg.num_examples, f"sample {split} {name}", split
    )
  return result


def _evaluate(ctx: Context, name: str, params_fn, ref_params_fn) -> dict:
  """The figures of `name`, computed once per workdir and kept in DIR/eval/<name>/."""
  out_dir = os.path.join(ctx.workdir, "eval", name)
  path = os.path.join(out_dir, RESULT_FILE)
  cfg = ctx.config
  # eval.test=False (choosing settings, `dqo_jax.compare --split=validation`): test is not read.
  held_out = "test" if cfg.eval.test else "validation"
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if held_out == "validation" or "accuracy" in cached:  # else: evaluated without test
      return cached
  params = params_fn()
  if held_out == "validation" and ctx.validation is None:
    raise UserError(
        "eval.test=False evaluates on the validation split, but there is none; set "
        "config.data.num_validation"
    )
  result = _accuracies(ctx, params, name, "test") if held_out == "test" else {}
  if ctx.validation is not None:
    result["validation"] = _accuracies(ctx, params, name, "validation")
  n = cfg.eval.num_examples if cfg.eval.num_examples > 0 else len(ctx.split(held_out))
  key = rng.key(cfg.seed, "eval.objective")
  result["objective"] = {
      split: sampled_objective(ctx, params, ref_params_fn(), split, n, float(cfg.dqo.beta), key)
      for split in ("train", held_out)
  }
  os.makedirs(out_dir, exist_ok=True)
  writer = ScalarWriter(out_dir)
  scored = result if held_out == "test" else result["validation"]
  writer.write(
      0,
      {
          f"{'' if held_out == 'test' else 'val_'}accuracy": scored["accuracy"],
          **{f"accuracy_steps_{k}": v for k, v in result.get("by_steps", {}).items()},
          **{f"sampled_{k}": v for k, v in result.get("sampled", {}).items() if k != "k"},
          **{f"{s}_{k}": v for s, o in result["objective"].items() for k, v in o.items()},
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
  name = methods.run_name(ctx.config)
  skipped = {r: skipped_updates(ctx, r) for r in ("sft", name)}
  sft_params = functools.cache(ctx.sft_params)
  results = {
      "sft": _evaluate(ctx, "sft", sft_params, sft_params),
      name: _evaluate(
          ctx, name, lambda: artifacts.trained_policy_params(ctx, sft_params), sft_params
      ),
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
  """A plain-text table: one row per method, greedy test accuracy overall and per step count,
  the sampled figures, validation greedy accuracy and the objective E[R] - beta KL on training
  and test prompts, each where it was measured."""
  steps = sorted({k for r in results.values() for k in r.get("by_steps", {})}, key=int)
  k = next((r["sampled"]["k"] for r in results.values() if "sampled" in r), None)
  columns = [("greedy", lambda r: r.get("accuracy"))]
  columns += [(f"{s} steps", lambda r, s=s: r.get("by_steps", {}).get(s)) for s in steps]
  if k is not None:
    columns += [
        (label, lambda r, key=key: r.get("sampled", {}).get(key))
        for label, key in (
            ("sampled", "accuracy"),
            (f"pass@{k}", "pass_at_k"),
            (f"maj@{k}", "maj_at_k"),
        )
    ]
  if any("validation" in r for r in results.values()):
    columns.append(("val greedy", lambda r: r.get("validation", {}).get("accuracy")))
  objective_splits = [
      s
      for s in ("train", "validation", "test")
      if any(s in r.get("objective", {}) for r in results.values())
  ]
  columns += [
      (
          f"obj {split}",
          lambda r, split=split: r.get("objective", {}).get(split, {}).get("objective"),
      )
      for split in objective_splits
  ]
  header = ["method"] + [label for label, _ in columns]
  fmt_value = lambda v: "-" if v is None else f"{v:.3f}"
  rows = [[name] + [fmt_value(get(r)) for _, get in columns] for name, r in results.items()]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
