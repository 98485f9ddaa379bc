"""What every benchmark module shares: interleaved timing and the row format of `benchmarks.run`.

The machine is shared and noisy, so every figure is a ratio of candidates timed side by side:
the candidates run in turn, one call each per round, after one warm-up call each (compilation
and caches), and a row reports per-candidate medians and the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each zero-argument function, `repeats` rounds, warm-up excluded."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
  """Median over rounds of numerator / denominator (rounds pair up: they ran back to back)."""
  return statistics.median(n / d for n, d in zip(numerator, denominator))


def row(name, ours, *, unit, baseline=None, ratio=None, target=None, at_least=False, notes=""):
  """One result row; `target` bounds `ratio` (or `ours` when there is no ratio) from above, or
  from below with `at_least`; `met` is None when the row has no target or no value."""
  value = ours if ratio is None else ratio
  met = None
  if target is not None and value is not None:
    met = bool(value >= target) if at_least else bool(value <= target)
  return dict(
      name=name,
      ours=ours,
      baseline=baseline,
      ratio=ratio,
      target=target,
      met=met,
      unit=unit,
      notes=notes,
  )
