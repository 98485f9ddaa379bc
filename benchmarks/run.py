"""All benchmarks as one table: `python -m benchmarks.run [--quick]`.

Prints a markdown table and writes benchmarks/results.json. Each module in MODULES exposes
`rows(quick: bool) -> list[dict]` with the keys of `benchmarks.timing.row`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time

import jax

MODULES = (
    "train_steps",
    "lora",
    "returns",
    "attention",
    "padding",
    "grading",
    "sampler",
    "rollouts",
)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
COLUMNS = ("name", "ours", "baseline", "ratio", "target", "met", "unit", "notes")


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def collect(quick: bool, modules=MODULES) -> list[dict]:
  """The rows of every module, in order."""
  return [r for name in modules for r in importlib.import_module(f"benchmarks.{name}").rows(quick)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes: minutes on a laptop CPU")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  start = time.time()
  rows = collect(args.quick)
  seconds = time.time() - start
  machine = dict(
      backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()],
      cpu_count=os.cpu_count(),
      platform=platform.platform(),
      jax=jax.__version__,
  )
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(
        dict(
            rows=rows,
            quick=args.quick,
            seconds=round(seconds, 1),
            date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
            machine=machine,
        ),
        f,
        indent=1,
        default=float,
    )
  print(markdown(rows))
  print(f"\n{len(rows)} rows in {seconds:.0f} s")
  print(f"written to {args.out}")


if __name__ == "__main__":
  main()
