"""Every method on the same data, evaluated the same way: `python -m dqo_jax.compare`.

    python -m dqo_jax.compare --config=configs/arith.py --workdir=DIR \
        --methods=sft,rft,dpo,kto,dro,dqo,dqo_ps --seeds=3 [--ablations] [--parallel=2]

The SFT checkpoint, the offline samples and (for dqo_ps) the rollouts are computed once, in
DIR/base. Each (method, seed) then runs the `train` and `eval` stages in DIR/runs/<method>/seed<k>,
a separate process started from the one config (saved as DIR/config.json) with the base linked
in; the seed changes the method's batch order and initialisation, not the data. Finished runs are
skipped, so rerunning the command resumes. Writes DIR/compare.md, DIR/compare.json and
DIR/compare.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import app, flags

from dqo_jax import workdir as workdir_lib
from dqo_jax.errors import UserError
from dqo_jax.main import command_line, parse_flags
from dqo_jax.metrics import read_scalars, write_json_atomic
from dqo_jax.stages.context import run_name

_METHODS = flags.DEFINE_list("methods", "sft,rft,dpo,kto,dro,dqo,dqo_ps", "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (0 .. seeds-1).")
_ABLATIONS = flags.DEFINE_bool("ablations", False, "Also run the DQO ablations in ABLATIONS.")
_ABLATION_SEEDS = flags.DEFINE_integer("ablation_seeds", 1, "Seeds per ablation.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs at a time, each pinned to its own CPU core when there are enough."
)

# Each entry: config overrides on top of the compared config.
METHODS = {
    "sft": {"method": "sft"},
    "rft": {"method": "rft"},
    "dpo": {"method": "dpo"},
    "kto": {"method": "kto"},
    "dro": {"method": "dro"},
    "dqo": {"method": "dqo"},
    "dqo_ps": {"method": "dqo", "dqo.process.enabled": True},
}
ABLATIONS = {
    "dqo_lam0": {"method": "dqo", "dqo.lam": 0.0},
    "dqo_lam0.95": {"method": "dqo", "dqo.lam": 0.95},
    "dqo_traces": {"method": "dqo", "dqo.importance_traces": True},
    "dqo_ps_lam0.95": {"method": "dqo", "dqo.process.enabled": True, "dqo.lam": 0.95},
}

# Every run's config, found from this package rather than the working directory, so that the
# command works from any directory.
FROM_JSON = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "from_json.py"
)


def _run_command(config_file, workdir, overrides) -> list[str]:
  overrides = {"stages": "train,eval", **overrides}
  return [
      sys.executable,
      "-m",
      "dqo_jax.main",
      f"--config={FROM_JSON}:{config_file}",
      f"--workdir={workdir}",
      *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]


def _link_base(base: str, workdir: str) -> None:
  """Links the shared stages, and the SFT checkpoint's evaluation, into a run's workdir."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  for stage in ("sft", "sample", "rollouts", os.path.join("eval", "sft")):
    link = os.path.join(workdir, stage)
    if os.path.isdir(os.path.join(base, stage)) and not os.path.lexists(link):
      os.symlink(os.path.join(base, stage), link)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _result(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, "eval", name, "DONE.json")
  if not os.path.exists(path):
    return None
  done = _read_json(path)
  acc, eval_seconds = done["summary"][name], done["seconds"]
  train_seconds = _read_json(os.path.join(workdir, name, "DONE.json"))["seconds"]
  # The accuracy monitor logs every `eval.every` steps; keep only its points.
  every = _read_json(os.path.join(workdir, "config.json"))["eval"]["every"]
  curve = read_scalars(os.path.join(workdir, name, "tb")).get("accuracy", [])
  curve = [(s, v) for s, v in curve if every and s % every == 0]
  return dict(acc, train_seconds=train_seconds, eval_seconds=eval_seconds, curve=curve)


def run_all(config, workdir: str, runs: dict, parallel: int) -> dict:
  """runs: {label: (overrides, seeds)} -> {label: {seed: result}}."""
  base = os.path.join(workdir, "base")
  config.data.dir = config.data.dir or os.path.join(base, "data")
  config_file = os.path.join(workdir, "config.json")
  write_json_atomic(config_file, json.loads(config.to_json_best_effort()))
  # The shared stages run in a child process too: this one never starts JAX, so starting the
  # runs (fork + exec) is safe.
  needs_rollouts = any(o.get("dqo.process.enabled") for o, _ in runs.values())
  base_overrides = {"stages": "sft,sample,rollouts" if needs_rollouts else "sft,sample"}
  if needs_rollouts:
    base_overrides["dqo.process.enabled"] = True
  t0 = time.time()
  proc = subprocess.run(_run_command(config_file, base, base_overrides))
  if proc.returncode:
    raise UserError(f"the shared stages failed (exit {proc.returncode}); see the output above")
  base_seconds = time.time() - t0
  os.makedirs(os.path.join(base, "eval", "sft"), exist_ok=True)

  jobs = []
  for label, (overrides, seeds) in runs.items():
    probe = config.copy_and_resolve_references()
    probe.update_from_flattened_dict(overrides)
    for seed in range(seeds):
      run_dir = os.path.join(workdir, "runs", label, f"seed{seed}")
      jobs.append((label, seed, run_dir, run_name(probe), dict(overrides, seed=seed)))

  cores = sorted(os.sched_getaffinity(0))
  pin = parallel > 1 and len(cores) >= parallel and shutil.which("taskset") is not None

  def launch(job_index):
    label, seed, run_dir, name, overrides = jobs[job_index]
    if _result(run_dir, name) is not None:
      return
    _link_base(base, run_dir)
    command = _run_command(config_file, run_dir, overrides)
    if pin:
      command = ["taskset", "-c", str(cores[job_index % parallel])] + command
    log = os.path.join(run_dir, "log.txt")
    with open(log, "a") as f:
      proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
    print(f"[compare] {label} seed {seed}: {status}", flush=True)

  t0 = time.time()
  with ThreadPoolExecutor(max(1, parallel)) as pool:
    list(pool.map(launch, range(len(jobs))))
  results = {}
  for label, seed, run_dir, name, _ in jobs:
    r = _result(run_dir, name)
    if r is not None:
      results.setdefault(label, {})[seed] = r
  sft = _read_json(os.path.join(base, "eval", "sft", "result.json"))
  base_stages = {
      s: _read_json(os.path.join(base, s, "DONE.json"))["seconds"]
      for s in ("sft", "sample", "rollouts")
      if os.path.exists(os.path.join(base, s, "DONE.json"))
  }
  return dict(
      sft_checkpoint=sft,
      runs=results,
      base_seconds=base_stages,
      # Summed from each run's own stage times, so a resumed comparison still reports them all.
      runs_seconds=round(
          sum(
              r["train_seconds"] + r["eval_seconds"]
              for seeds in results.values()
              for r in seeds.values()
          ),
          1,
      ),
      this_invocation_wall_seconds=round(base_seconds + time.time() - t0, 1),
      parallel=parallel,
  )


def summarize(results: dict) -> dict:
  """Mean and sample std over seeds of each method's accuracy, overall and per step count."""
  rows = {}
  for label, seeds in results["runs"].items():
    accs = np.array([r["accuracy"] for r in seeds.values()])
    steps = sorted({k for r in seeds.values() for k in r["by_steps"]}, key=int)
    rows[label] = dict(
        seeds=len(accs),
        mean=float(accs.mean()),
        std=float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
        by_steps={s: float(np.mean([r["by_steps"][s] for r in seeds.values()])) for s in steps},
        train_seconds=float(np.mean([r["train_seconds"] for r in seeds.values()])),
    )
  return rows


def markdown(results: dict, rows: dict) -> str:
  sft = results["sft_checkpoint"]
  steps = sorted(sft["by_steps"], key=int)
  head = ["method", "seeds", "greedy accuracy", *(f"{s} steps" for s in steps), "train s/run"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  sft_cells = ["SFT checkpoint (start)", "-", f"{sft['accuracy']:.3f}"]
  sft_cells += [f"{sft['by_steps'][s]:.3f}" for s in steps] + ["-"]
  lines.append("| " + " | ".join(sft_cells) + " |")
  for label, r in rows.items():
    cells = [label, str(r["seeds"]), f"{r['mean']:.3f} ± {r['std']:.3f}"]
    cells += [f"{r['by_steps'].get(s, float('nan')):.3f}" for s in steps]
    cells.append(f"{r['train_seconds']:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  base = ", ".join(f"{k} {v:.0f} s" for k, v in results["base_seconds"].items())
  lines += [
      "",
      f"Shared stages (computed once): {base}. Method runs: {results['runs_seconds']:.0f} s "
      f"summed over runs (train + eval), {results['parallel']} at a time. Accuracy: greedy "
      "decoding on the test split, mean ± sample std over seeds; 'train s/run' includes the "
      "periodic accuracy monitor.",
  ]
  return "\n".join(lines) + "\n"


def plot(results: dict, rows: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (bars, curves) = plt.subplots(1, 2, figsize=(15, 4.5))
  labels = list(rows)
  x = np.arange(len(labels))
  bars.bar(x, [rows[l]["mean"] for l in labels], yerr=[rows[l]["std"] for l in labels], capsize=4)
  bars.axhline(results["sft_checkpoint"]["accuracy"], color="gray", ls="--", label="SFT start")
  bars.set_xticks(x, labels, rotation=30, ha="right")
  bars.set_ylabel("greedy test accuracy")
  bars.set_title("mean ± std over seeds")
  bars.legend()
  colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(labels), 2)))
  for color, label in zip(colors, labels):
    curves_by_seed = [r["curve"] for r in results["runs"][label].values() if r["curve"]]
    if not curves_by_seed:
      continue
    steps = [s for s, _ in curves_by_seed[0]]
    n = min(len(c) for c in curves_by_seed)
    mean = np.mean([[v for _, v in c[:n]] for c in curves_by_seed], axis=0)
    curves.plot(steps[:n], mean, marker="o", label=label, color=color)
  curves.set_xlabel("training step")
  curves.set_ylabel("accuracy on the monitored test slice")
  curves.set_title("while training (mean over seeds)")
  curves.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  config, workdir = command_line(argv)
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown:
    print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
    sys.exit(2)
  runs = {m: (METHODS[m], _SEEDS.value) for m in _METHODS.value}
  if _ABLATIONS.value:
    runs.update({k: (v, _ABLATION_SEEDS.value) for k, v in ABLATIONS.items()})
  try:
    if workdir_lib.is_url(workdir):
      raise UserError(
          f"--workdir={workdir}: the comparison runs its jobs in local directories; pass a "
          "local path (or a bucket mounted with gcsfuse)"
      )
    workdir = workdir_lib.check_local(workdir)
    results = run_all(config, workdir, runs, _PARALLEL.value)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  rows = summarize(results)
  write_json_atomic(os.path.join(workdir, "compare.json"), dict(results, summary=rows))
  table = markdown(results, rows)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(table)
  plot(results, rows, os.path.join(workdir, "compare.png"))
  print("\n" + table + f"\nwritten: {workdir}/compare.md, compare.json, compare.png")
  missing = [m for m, (_, seeds) in runs.items() if len(results["runs"].get(m, {})) < seeds]
  if missing:
    print(
        f"error: runs failed for {missing}; see their log.txt under {workdir}/runs", file=sys.stderr
    )
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
