"""Every method on the same data, evaluated the same way: `python -m dqo_jax.compare`.

    python -m dqo_jax.compare --config=configs/arith.py --workdir=DIR \
        --methods=sft,rft,dpo,kto,rloo,dro,dqo,dqo_ps --seeds=3 [--ablations] [--parallel=2] \
        [--split=validation] [--base_per_seed]

The SFT checkpoint, the offline samples and (for dqo_ps) the rollouts are computed once, in
DIR/base. Each (method, seed) then runs the `train` and `eval` stages in DIR/runs/<method>/seed<k>,
a separate process started from the one config (saved as DIR/config.json) with the base linked
in; the seed changes the method's batch order and initialisation, not the data. With
--base_per_seed, seed k's runs share a base of their own (DIR/base/seed<k>, made with seed k), so
that a seed pairs whole pipelines, the SFT start included. Finished runs are skipped, so rerunning
the command resumes.

--split=validation scores every run on the validation split and never reads test: settings are
chosen that way, and test is read once per reported number (the default). The table gives, per
method, greedy and sampled accuracy, the mean paired difference from the SFT start of the same
seed with its 95% interval, and E[R] - beta KL of fresh samples on training and held-out prompts.
Writes DIR/compare.md, DIR/compare.json and DIR/compare.png.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import app, flags

from dqo_jax import methods
from dqo_jax import workdir as workdir_lib
from dqo_jax.errors import UserError
from dqo_jax.main import command_line, parse_flags
from dqo_jax.metrics import read_scalars, write_json_atomic

# Each entry: config overrides on top of the compared config (`dqo_jax.methods`).
METHODS = methods.compare_labels()
ABLATIONS = methods.compare_labels(ablations=True)

_METHODS = flags.DEFINE_list(
    "methods",
    ",".join(METHODS),
    "Methods to compare: "
    + "; ".join(f"{name}: {m.summary}" for name, m in methods.registry().items())
    + "; and their variants ("
    + ", ".join(k for k in METHODS if k not in methods.registry())
    + ").",
)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (0 .. seeds-1).")
_LORA_RANKS = flags.DEFINE_list(
    "lora_ranks",
    [],
    "Also run each method with LoRA adapters of these ranks (labels METHOD_loraR) over the same "
    "SFT start, which trains every weight (config.model.lora, dqo_jax/lora.py).",
)
_ABLATIONS = flags.DEFINE_bool("ablations", False, "Also run the DQO ablations in ABLATIONS.")
_ABLATION_SEEDS = flags.DEFINE_integer("ablation_seeds", 1, "Seeds per ablation.")
_SPLIT = flags.DEFINE_enum(
    "split",
    "test",
    ["test", "validation"],
    "Where the runs are scored: validation to choose settings (the test split is then not read), "
    "test once per reported number.",
)
_BASE_PER_SEED = flags.DEFINE_bool(
    "base_per_seed",
    False,
    "Give each seed its own SFT checkpoint and samples (made with that seed), so that seeds pair "
    "whole pipelines and the SFT start varies too.",
)
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs at a time, each pinned to its own CPU core when there are enough."
)

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
  curve = read_scalars(os.path.join(workdir, name, "tb")).get("val_accuracy", [])
  curve = [(s, v) for s, v in curve if every and s % every == 0]
  return dict(acc, train_seconds=train_seconds, eval_seconds=eval_seconds, curve=curve)


def _launch(command: list[str], log: str, core: int | None) -> int:
  if core is not None:
    command = ["taskset", "-c", str(core)] + command
  with open(log, "a") as f:
    return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode


def run_all(
    config,
    workdir: str,
    runs: dict,
    parallel: int,
    split: str = "test",
    base_per_seed: bool = False,
) -> dict:
  """runs: {label: (overrides, seeds)} -> {label: {seed: result}}, each run scored on `split`
  ("validation": the test split is not read). base_per_seed: seed k's runs share an SFT checkpoint
  and samples of their own, made with seed k, so that seeds pair whole pipelines."""
  config.data.dir = config.data.dir or os.path.join(workdir, "base", "data")
  config_file = os.path.join(workdir, "config.json")
  write_json_atomic(config_file, json.loads(config.to_json_best_effort()))
  num_seeds = max(seeds for _, seeds in runs.values())
  bases = {
      k: os.path.join(workdir, "base", f"seed{k}")
      if base_per_seed
      else os.path.join(workdir, "base")
      for k in range(num_seeds)
  }
  probes = {}
  for label, (overrides, _) in runs.items():
    probes[label] = config.copy_and_resolve_references()
    probes[label].update_from_flattened_dict(overrides)
  # The shared stages run under the first run that reads the rollouts, so that they are made.
  rollouts = [l for l, p in probes.items() if methods.of(p).needs_rollouts(p)]
  base_overrides = {"stages": "sft,sample,rollouts" if rollouts else "sft,sample"}
  if rollouts:
    base_overrides.update(runs[rollouts[0]][0])
  common = {"eval.test": split == "test"}

  cores = sorted(os.sched_getaffinity(0))
  pin = parallel > 1 and len(cores) >= parallel and shutil.which("taskset") is not None
  # A core is taken by each child process while it runs and given back after.
  free_cores = queue.SimpleQueue()
  for core in cores[:parallel] if pin else [None] * max(1, parallel):
    free_cores.put(core)

  def launch_on_a_core(command, log) -> int:
    core = free_cores.get()
    try:
      return _launch(command, log, core)
    finally:
      free_cores.put(core)

  jobs = []
  for label, (overrides, seeds) in runs.items():
    name = methods.run_name(probes[label])
    for seed in range(seeds):
      run_dir = os.path.join(workdir, "runs", label, f"seed{seed}")
      jobs.append((label, seed, run_dir, name, dict(overrides, seed=seed, **common)))

  # The shared stages run in child processes too: this one never starts JAX, so starting the
  # runs (fork + exec) is safe. A run starts as soon as its seed's shared stages are done: all
  # of them are queued before any run, so a run never holds a worker its base is waiting for.
  base_code = dict.fromkeys(bases)
  base_done = {k: threading.Event() for k in bases}
  data_ready = threading.Event()  # seed 0's process prepares the data and tokenizer first

  def wait_for_data(log):
    while not data_ready.wait(1.0):
      if os.path.exists(log):
        with open(log) as f:
          if "[setup]" in f.read():
            data_ready.set()

  def launch_base(k):
    os.makedirs(bases[k], exist_ok=True)
    log = os.path.join(bases[k], "log.txt")
    if k == 0:
      threading.Thread(target=wait_for_data, args=(log,), daemon=True).start()
    else:
      data_ready.wait()
    overrides = dict(base_overrides, seed=k, **common)
    code = launch_on_a_core(_run_command(config_file, bases[k], overrides), log)
    data_ready.set()  # seed 0 failed before its setup line: let the others fail or run
    os.makedirs(os.path.join(bases[k], "eval", "sft"), exist_ok=True)
    base_code[k] = code
    base_done[k].set()
    print(f"[compare] shared stages, seed {k}: {'done' if code == 0 else 'FAILED'}", flush=True)

  def launch(job_index):
    label, seed, run_dir, name, overrides = jobs[job_index]
    if _result(run_dir, name) is not None:
      return
    base_done[seed if base_per_seed else 0].wait()
    if base_code[seed if base_per_seed else 0]:
      return
    _link_base(bases[seed], run_dir)
    log = os.path.join(run_dir, "log.txt")
    code = launch_on_a_core(_run_command(config_file, run_dir, overrides), log)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {log})"
    print(f"[compare] {label} seed {seed}: {status}", flush=True)

  t0 = time.time()
  if not base_per_seed:
    # One set of shared stages, on every core, before the runs.
    proc = subprocess.run(_run_command(config_file, bases[0], dict(base_overrides, **common)))
    if proc.returncode:
      raise UserError(f"the shared stages failed (exit {proc.returncode}); see the output above")
    os.makedirs(os.path.join(bases[0], "eval", "sft"), exist_ok=True)
    base_code[0] = 0
    base_done[0].set()
  with ThreadPoolExecutor(max(1, parallel)) as pool:
    tasks = [pool.submit(launch_base, k) for k in bases] if base_per_seed else []
    tasks += [pool.submit(launch, i) for i in range(len(jobs))]
    for task in tasks:
      task.result()
  failed = sorted(k for k, code in base_code.items() if code)
  if failed:
    raise UserError(
        f"the shared stages failed for seed(s) {failed}; see log.txt in {workdir}/base/seed<k>"
    )
  results = {}
  for label, seed, run_dir, name, _ in jobs:
    r = _result(run_dir, name)
    if r is not None:
      results.setdefault(label, {})[seed] = r
  sft_start = {}
  for k, base in bases.items():
    path = os.path.join(base, "eval", "sft", "result.json")
    if os.path.exists(path):  # written by the first of its runs that finished
      sft_start[k] = _read_json(path)
  base_stages = {
      s: float(
          np.mean(
              [_read_json(os.path.join(b, s, "DONE.json"))["seconds"] for b in set(bases.values())]
          )
      )
      for s in ("sft", "sample", "rollouts")
      if os.path.exists(os.path.join(bases[0], s, "DONE.json"))
  }
  return dict(
      split=split,
      base_per_seed=base_per_seed,
      sft_start=sft_start,
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
      this_invocation_wall_seconds=round(time.time() - t0, 1),
      parallel=parallel,
  )


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
# fmt: off
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on


def paired_interval(differences) -> tuple[float, float, float]:
  """(mean, low, high): the mean of paired differences and its 95% t interval (nan bounds with
  fewer than two pairs)."""
  d = np.asarray(differences, np.float64)
  if len(d) < 2:
    return float(d.mean()) if len(d) else float("nan"), float("nan"), float("nan")
  half = (_T975[len(d) - 2] if len(d) - 1 <= len(_T975) else 1.96) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def scores(result: dict, split: str) -> dict:
  """The figures of one evaluated run on `split`: greedy and sampled accuracy, and E[R] - beta KL
  (with its KL) of fresh samples on the training prompts and on the held-out split."""
  scored = result if split == "test" else result.get("validation", {})
  objective = result.get("objective", {})
  out = dict(greedy=scored.get("accuracy"), sampled=scored.get("sampled", {}).get("accuracy"))
  for where, key in (("train", "train"), ("held_out", split)):
    o = objective.get(key)
    if o is not None:
      out[f"objective_{where}"], out[f"kl_{where}"] = o["objective"], o["kl"]
  return out


def summarize(results: dict) -> dict:
  """Per method: the mean and sample std over seeds of each score, and for greedy and sampled
  accuracy the mean paired difference from the SFT start of the same seed with its 95% interval
  (with one shared SFT checkpoint, that interval holds only the method's seed variation)."""
  split = results["split"]
  start = {int(k): scores(r, split) for k, r in results["sft_start"].items()}
  rows = {}
  for label, seeds in results["runs"].items():
    per_seed = {int(k): scores(r, split) for k, r in seeds.items()}
    row = dict(seeds=len(per_seed))
    for key in ("greedy", "sampled", "objective_train", "kl_train", "objective_held_out"):
      values = np.array([s[key] for s in per_seed.values() if s.get(key) is not None])
      if len(values):
        row[key] = float(values.mean())
        row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    start_of = lambda k: start.get(k, start.get(0, {}))  # a shared base has seed 0's only
    for key in ("greedy", "sampled"):
      pairs = [
          s[key] - start_of(k)[key]
          for k, s in per_seed.items()
          if s.get(key) is not None and start_of(k).get(key) is not None
      ]
      if pairs:
        row[f"{key}_minus_start"] = paired_interval(pairs)
    row["train_seconds"] = float(np.mean([r["train_seconds"] for r in seeds.values()]))
    rows[label] = row
  return rows


def markdown(results: dict, rows: dict) -> str:
  split = results["split"]
  start = [scores(r, split) for r in results["sft_start"].values()]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  mean_of = (
      lambda key: float(np.mean([s[key] for s in start]))
      if start and all(s.get(key) is not None for s in start)
      else None
  )
  interval = (
      lambda t: "-"
      if t is None
      else (f"{t[0]:+.3f}" if np.isnan(t[1]) else f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]")
  )
  head = [
      "method",
      "seeds",
      "greedy",
      "sampled (T=1)",
      "greedy - start [95%]",
      "sampled - start [95%]",
      "obj train",
      f"obj {split}",
      "KL train",
      "train s/run",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  start_cells = [
      "SFT checkpoint (start)",
      str(len(start)),
      fmt(mean_of("greedy")),
      fmt(mean_of("sampled")),
      "-",
      "-",
      fmt(mean_of("objective_train")),
      fmt(mean_of("objective_held_out")),
      "0",
      "-",
  ]
  lines.append("| " + " | ".join(start_cells) + " |")
  with_std = lambda r, key: "-" if key not in r else f"{r[key]:.3f} ± {r[key + '_std']:.3f}"
  for label, r in rows.items():
    cells = [
        label,
        str(r["seeds"]),
        with_std(r, "greedy"),
        with_std(r, "sampled"),
        interval(r.get("greedy_minus_start")),
        interval(r.get("sampled_minus_start")),
        fmt(r.get("objective_train")),
        fmt(r.get("objective_held_out")),
        fmt(r.get("kl_train")),
        f"{r['train_seconds']:.0f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  base = ", ".join(f"{k} {v:.0f} s" for k, v in results["base_seconds"].items())
  pairing = (
      "each seed its own SFT checkpoint and samples, so the intervals pair whole pipelines"
      if results["base_per_seed"]
      else "one SFT checkpoint and sample set for every seed, so the intervals hold only the "
      "methods' own seed variation"
  )
  lines += [
      "",
      f"Scored on the {split} split; mean ± sample std over seeds; 'start [95%]': the mean "
      f"paired difference from the SFT start of the same seed and its 95% t interval ({pairing}). "
      "obj: E[R] - beta KL(pi || pi_ref) of fresh samples on the training prompts and on the "
      f"{split} prompts. Shared stages: {base}. Method runs: {results['runs_seconds']:.0f} s "
      f"summed over runs (train + eval), {results['parallel']} at a time; 'train s/run' includes "
      "the periodic monitor.",
  ]
  return "\n".join(lines) + "\n"


def plot(results: dict, rows: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  split = results["split"]
  fig, (bars, curves) = plt.subplots(1, 2, figsize=(15, 4.5))
  labels = list(rows)
  x = np.arange(len(labels))
  for offset, key in ((-0.2, "greedy"), (0.2, "sampled")):
    means = [rows[l].get(key, np.nan) for l in labels]
    stds = [rows[l].get(f"{key}_std", 0.0) for l in labels]
    bars.bar(x + offset, means, width=0.4, yerr=stds, capsize=4, label=key)
  start = [scores(r, split) for r in results["sft_start"].values()]
  for key, style in (("greedy", "--"), ("sampled", ":")):
    if start and all(s.get(key) is not None for s in start):
      bars.axhline(
          np.mean([s[key] for s in start]), color="gray", ls=style, label=f"SFT start, {key}"
      )
  bars.set_xticks(x, labels, rotation=30, ha="right")
  bars.set_ylabel(f"{split} accuracy")
  bars.set_title("mean ± std over seeds")
  bars.legend(fontsize=8)
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
  curves.set_ylabel("greedy accuracy on the monitored validation slice")
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
  for rank in map(int, _LORA_RANKS.value):
    adapters = {"model.lora.rank": rank, "model.lora.stages": "train"}
    runs.update({f"{m}_lora{rank}": (METHODS[m] | adapters, _SEEDS.value) for m in _METHODS.value})
  if _ABLATIONS.value:
    runs.update({k: (v, _ABLATION_SEEDS.value) for k, v in ABLATIONS.items()})
  try:
    if workdir_lib.is_url(workdir):
      raise UserError(
          f"--workdir={workdir}: the comparison runs its jobs in local directories; pass a "
          "local path (or a bucket mounted with gcsfuse)"
      )
    workdir = workdir_lib.check_local(workdir)
    results = run_all(config, workdir, runs, _PARALLEL.value, _SPLIT.value, _BASE_PER_SEED.value)
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
