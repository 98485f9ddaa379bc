"""Where RL improves on its SFT start: one axis of the embedded task's regime at a time, scored on
the validation split only (the test split is never read here).

    python -m benchmarks.regime_study --dir=/tmp/study [--only=NAME,...] [--parallel=2]

Each setting is a `dqo_jax.compare --split=validation` run of some methods in DIR/<setting>, on
top of an SFT checkpoint shared by every setting with the same start (DIR/sft_<start>, trained
once): continued SFT (`sft`), RFT, DRO and DQO, all from that checkpoint. Settings change one
thing against the reference setting of their axis; `--only` runs some of them. Finished runs are
skipped, so rerunning resumes. Writes DIR/study.json, DIR/study.md (one row per setting and
method) and DIR/study_<axis>.png; docs/results.md shows what was run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "arith.py")

# The reference RL setting: answers-only prompts, K = 4, the budget the embedded config had while
# the study ran (configs/arith.py:prompts2000; the default since takes 6,000 prompts at lr 3e-5).
REFERENCE = {
    "sample.num_prompts": 2000,
    "sample.samples_per_prompt": 4,
    "train.policy_optimizer.lr": 1e-4,
}

# Every method at the reference points; where only the samples change, continued SFT (on the gold
# subset alone) would repeat the reference's run, and where only beta changes, RFT's too. (The
# budget settings leave continued SFT out for time.)
ALL, SAMPLED, BETA = "sft,rft,dro,dqo", "rft,dro,dqo", "dro,dqo"
LR3E4 = {"train.policy_optimizer.lr": 3e-4, "train.value_optimizer.lr": 3e-3}

# The SFT starts: gold solutions of the first 1000 training problems or of all, trained for
# 1,200 steps (the earlier default, validation accuracy still rising) or for 3,600 (where it has
# stopped rising), in plain shuffled batches as when these were run; and the shipped default's
# (1000 gold, 3,000 steps, plain batches).
STARTS = {
    "g1000": {"data.num_gold": 1000, "sft.steps": 1200, "sft.length_buckets": 1},
    "all": {"data.num_gold": -1, "sft.steps": 1200, "sft.length_buckets": 1},
    "g1000_sft3600": {"data.num_gold": 1000, "sft.steps": 3600, "sft.length_buckets": 1},
    "default": {},
}

# name: (axis, start, methods, overrides on top of REFERENCE). Each axis varies one thing; its
# reference point is the setting named "<start>_ref".
SETTINGS = {
    "g1000_ref": ("start", "g1000", ALL, {}),
    "all_ref": ("start", "all", ALL, {}),
    "g1000_sft3600_ref": ("start", "g1000_sft3600", ALL, {}),
    "g1000_lr3e-4": ("budget", "g1000", SAMPLED, LR3E4),
    "g1000_warmup100": ("value warmup", "g1000", "dqo", {"dqo.value_warmup_steps": 100}),
    "g1000_k16": ("samples per prompt", "g1000", SAMPLED, {"sample.samples_per_prompt": 16}),
    "g1000_prompts6000": ("prompts", "g1000", SAMPLED, {"sample.num_prompts": 6000}),
    "g1000_beta0.1": ("beta", "g1000", BETA, {"dqo.beta": 0.1, "dro.beta": 0.1}),
    "g1000_steps1600": ("budget", "g1000", SAMPLED, {"train.steps": 1600}),
    "g1000_k2": ("samples per prompt", "g1000", SAMPLED, {"sample.samples_per_prompt": 2}),
    "g1000_beta1": ("beta", "g1000", BETA, {"dqo.beta": 1.0, "dro.beta": 1.0}),
    # The axes again on the shipped default's start, where the reward is the only new signal;
    # dqo_ps is DQO with process supervision (Monte-Carlo rollouts of the SFT policy at every
    # step, the paper's case for token-level credit).
    "default_ref": ("start", "default", ALL + ",dqo_ps", {}),
    "default_k2": ("samples per prompt", "default", SAMPLED, {"sample.samples_per_prompt": 2}),
    "default_k16": ("samples per prompt", "default", SAMPLED, {"sample.samples_per_prompt": 16}),
    "default_prompts6000": ("prompts", "default", SAMPLED, {"sample.num_prompts": 6000}),
    "default_steps1600": ("budget", "default", SAMPLED, {"train.steps": 1600}),
    "default_lr3e-4": ("budget", "default", SAMPLED, LR3E4),
    "default_beta0.1": ("beta", "default", BETA, {"dqo.beta": 0.1, "dro.beta": 0.1}),
    "default_beta1": ("beta", "default", BETA, {"dqo.beta": 1.0, "dro.beta": 1.0}),
    # Two rounds (sample the trained policy, train again from it: twice the steps), pi_ref kept
    # at the SFT policy or moved to the round's start.
    "default_rounds2": ("rounds", "default", SAMPLED, {"train.rounds": 2}),
    "default_rounds2_previous": (
        "rounds",
        "default",
        "dqo",
        {"train.rounds": 2, "train.round_reference": "previous"},
    ),
}


def _overrides(d: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in d.items()]


def _sft_dir(study: str, start: str) -> str:
  return os.path.join(study, f"sft_{start}")


def _common(study: str, start: str) -> list[str]:
  return [f"--config={CONFIG}", f"--config.data.dir={os.path.join(study, 'data')}"] + _overrides(
      STARTS[start]
  )


def train_sft(study: str, start: str) -> None:
  """An SFT start, shared by its settings (its monitor reads validation)."""
  workdir = _sft_dir(study, start)
  cmd = [sys.executable, "-m", "dqo_jax.main", f"--workdir={workdir}", *_common(study, start)]
  subprocess.run(cmd + ["--config.stages=sft"], check=True)


def run_setting(study: str, name: str, parallel: int) -> None:
  _, start, methods, overrides = SETTINGS[name]
  workdir = os.path.join(study, name)
  base = os.path.join(workdir, "base")
  os.makedirs(os.path.join(base, "eval"), exist_ok=True)
  sft = _sft_dir(study, start)
  os.makedirs(os.path.join(sft, "eval", "sft"), exist_ok=True)
  # The shared SFT checkpoint and its evaluation: computed once per start; and the reference
  # setting's samples where this setting does not change how they are drawn.
  shared = {part: os.path.join(sft, part) for part in ("sft", os.path.join("eval", "sft"))}
  ref_sample = os.path.join(study, f"{start}_ref", "base", "sample")
  if not any(k.startswith("sample.") for k in overrides) and name != f"{start}_ref":
    if not os.path.exists(os.path.join(ref_sample, "DONE.json")):
      run_setting(study, f"{start}_ref", parallel)
    shared["sample"] = ref_sample
  for part, target in shared.items():
    if not os.path.lexists(os.path.join(base, part)):
      os.symlink(target, os.path.join(base, part))
  cmd = [
      sys.executable,
      "-m",
      "dqo_jax.compare",
      f"--workdir={workdir}",
      f"--methods={methods}",
      "--seeds=1",
      f"--parallel={parallel}",
      "--split=validation",
      *_common(study, start),
      *_overrides({**REFERENCE, **overrides}),
  ]
  subprocess.run(cmd, check=True)


def collect(study: str) -> dict:
  """{setting: {"axis", "start", "overrides", "samples", "sft_start", "methods": {method:
  scores}}} of the settings that have finished."""
  from dqo_jax.compare import scores

  out = {}
  for name, (axis, start, _, overrides) in SETTINGS.items():
    path = os.path.join(study, name, "compare.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      compared = json.load(f)
    samples = json.load(open(os.path.join(study, name, "base", "sample", "DONE.json")))["summary"]
    out[name] = dict(
        axis=axis,
        start=start,
        overrides=overrides,
        samples=samples,
        sft_start=scores(compared["sft_start"]["0"], "validation"),
        methods={m: scores(r["0"], "validation") for m, r in compared["runs"].items()},
    )
  return out


def markdown(study: dict) -> str:
  cols = ("greedy", "sampled", "objective_train", "objective_held_out", "kl_train")
  head = ["setting", "axis", "method", "val greedy", "val sampled", "obj train", "obj val", "KL"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  for name, s in study.items():
    rows = [("SFT start", s["sft_start"])] + list(s["methods"].items())
    for method, r in rows:
      lines.append(
          "| " + " | ".join([name, s["axis"], method] + [fmt(r.get(c)) for c in cols]) + " |"
      )
  return "\n".join(lines) + "\n"


def plot(study: dict, path_prefix: str) -> list[str]:
  """One figure per axis: validation greedy and sampled accuracy of each method against the SFT
  start, per setting of that axis (its reference setting included)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  for axis in sorted({s["axis"] for s in study.values()}):
    names = [n for n, s in study.items() if s["axis"] == axis]
    if axis != "start":  # the axis's reference point
      ref = f"{study[names[0]]['start']}_ref"
      names = ([ref] if ref in study else []) + names
    fig, panels = plt.subplots(1, 2, figsize=(12, 4))
    for panel, key in zip(panels, ("greedy", "sampled")):
      methods = ["SFT start"] + sorted({m for n in names for m in study[n]["methods"]})
      width = 0.8 / len(methods)
      x = np.arange(len(names))
      for i, m in enumerate(methods):
        vals = [
            (study[n]["sft_start"] if m == "SFT start" else study[n]["methods"].get(m, {})).get(key)
            for n in names
        ]
        vals = [np.nan if v is None else v for v in vals]
        panel.bar(x + (i - len(methods) / 2 + 0.5) * width, vals, width, label=m)
      panel.set_xticks(x, names, rotation=20, ha="right")
      panel.set_ylabel(f"validation {key} accuracy")
      panel.set_title(f"axis: {axis}")
    panels[1].legend(fontsize=8)
    fig.tight_layout()
    path = f"{path_prefix}_{axis.replace(' ', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def plot_gains(study: dict, start: str, path: str) -> bool:
  """Every setting of one SFT start in one figure: each method's validation accuracy minus the
  start's (greedy, sampled) and its KL from the start on training prompts, so that the axes can
  be compared at a glance. False if no setting of `start` has finished."""
  names = sorted(
      (n for n, s in study.items() if s["start"] == start), key=lambda n: n != f"{start}_ref"
  )
  if not names:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = sorted({m for n in names for m in study[n]["methods"]})
  fig, panels = plt.subplots(1, 3, figsize=(16, 4))
  x, width = np.arange(len(names)), 0.8 / len(methods)
  for panel, key in zip(panels, ("greedy", "sampled", "kl_train")):
    for i, m in enumerate(methods):
      vals = []
      for n in names:
        r = study[n]["methods"].get(m, {})
        base = 0.0 if key == "kl_train" else study[n]["sft_start"][key]
        vals.append(np.nan if r.get(key) is None else r[key] - base)
      panel.bar(x + (i - len(methods) / 2 + 0.5) * width, vals, width, label=m)
    panel.axhline(0, color="black", lw=0.8)
    panel.set_xticks(x, names, rotation=25, ha="right")
    panel.set_ylabel(
        "KL(pi || SFT), training prompts"
        if key == "kl_train"
        else f"validation {key} accuracy - SFT start"
    )
  panels[0].legend(fontsize=8)
  fig.suptitle(f"start {start}: one seed per setting (an RL seed's spread is about 0.01)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_sft_curves(study: str, path: str) -> None:
  """Greedy validation accuracy of each SFT start while it trained (its monitor's slice)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from dqo_jax.metrics import read_scalars

  fig, ax = plt.subplots(figsize=(7, 4))
  for start, overrides in STARTS.items():
    tb = os.path.join(_sft_dir(study, start), "sft", "tb")
    if os.path.isdir(tb):
      curve = read_scalars(tb).get("val_accuracy", [])
      ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=start)
  ax.set_xlabel("SFT step")
  ax.set_ylabel("greedy accuracy, first 250 validation problems")
  ax.set_title("SFT starts while training")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True)
  parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--report_only", action="store_true", help="only collect and plot")
  args = parser.parse_args()
  study = os.path.abspath(args.dir)
  names = [n for n in args.only.split(",") if n] or list(SETTINGS)
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    sys.exit(f"error: unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
  if not args.report_only:
    for name in names:
      start = SETTINGS[name][1]
      if not os.path.exists(os.path.join(_sft_dir(study, start), "sft", "DONE.json")):
        train_sft(study, start)
      run_setting(study, name, args.parallel)
  results = collect(study)
  with open(os.path.join(study, "study.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  with open(os.path.join(study, "study.md"), "w") as f:
    f.write(table)
  figures = plot(results, os.path.join(study, "study"))
  for start in STARTS:
    path = os.path.join(study, f"study_gains_{start}.png")
    if plot_gains(results, start, path):
      figures.append(path)
  plot_sft_curves(study, os.path.join(study, "study_sft.png"))
  figures.append(os.path.join(study, "study_sft.png"))
  print(table + "\nwritten: " + ", ".join(["study.json", "study.md"] + figures))


if __name__ == "__main__":
  main()
