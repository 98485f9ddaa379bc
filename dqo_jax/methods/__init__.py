"""The training methods, one module each in this package, registered by name when imported.

A method module defines `METHOD = Method(...)`: its data view over the offline samples (or the
gold solutions), its objective, whether it trains a value model, its config section's defaults
and checks, and the run directories it writes. The `train` stage, `dqo_jax.compare`, config
checking, `--redo` and `--compile_only` read this registry; nothing else names a method.
Adding one is adding a module here (the registry finds it) and its test file.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from dqo_jax import registry as registry_lib
from dqo_jax import rng
from dqo_jax.data.batches import Encoded, batch_fn
from dqo_jax.errors import UserError


@dataclasses.dataclass
class View:
  """A method's training data: `batch_at(step)` -> batch, and a description for the summary."""

  batch_at: Callable[[int], dict]
  size: int
  describe: dict


@dataclasses.dataclass
class TrainData:
  """What a method's view may read. The offline samples are read on first use, so a method
  that trains on the gold solutions alone never opens them."""

  config: Any
  gold: Encoded  # the gold solutions SFT trained on
  # The sampled prompts' gold solutions where training may read them (None: answers only).
  known: Encoded | None
  read_samples: Callable[[], tuple[list[dict], dict[str, np.ndarray]]]
  # (prompt, prompt_mask, response, response_len) -> log pi_ref per response token [N, R].
  reference_logprobs: Callable[..., np.ndarray]
  read_potentials: Callable[[], list[dict]]  # the rollouts stage's Phi(s_t) records

  @functools.cached_property
  def samples(self) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(records, arrays): the sample stage's records and their arrays in the batch layout."""
    return self.read_samples()

  @property
  def seed(self) -> int:
    """The seed of the batch order and of any subset a view draws."""
    return rng.numpy_seed(self.config.seed, "train.batches")

  def batches(self, arrays, n: int, batch_size: int | None = None, rows=lambda idx: idx):
    """batch_at over `n` examples of `arrays` (`dqo_jax.data.batches.batch_fn`), with the
    train section's batch size and length buckets."""
    t = self.config.train
    size = t.batch_size if batch_size is None else batch_size
    return batch_fn(arrays, n, size, self.seed, int(t.length_buckets), rows)


def _no_check(config) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method. The `train` stage builds `view(data)`, then `objective(config, view)`:
  objective(logp [B, R], batch) -> (loss, metrics) for a policy alone, or, with
  `trains_value`, objective(logp, values [B, R], batch, step) -> (policy_loss(logp),
  value_loss(values), metrics) (`dqo_jax.train.policy_value_step`). `objective(config, None)`
  must work for value methods: `--compile_only` builds their step without data."""

  name: str  # config.method
  view: Callable[[TrainData], View]
  objective: Callable[[Any, View | None], Callable]
  summary: str  # one line for --help and the docs
  # Where it stands in comparisons' tables: supervised, then sequence-level, then token-level.
  order: int
  trains_value: bool = False
  reads_samples: bool = True  # False: the gold solutions only (continued SFT)
  rows_per_example: int = 1  # device rows per `train.batch_size` example (pairs: 2)
  # config.<name>'s defaults, given the KL coefficient the RL methods share (`beta`).
  defaults: Callable[[float], dict] | None = None
  check: Callable[[Any], None] = _no_check  # UserError on a bad config.<name>
  runs: tuple[str, ...] = ()  # every run directory it writes; () = (name,)
  run_name: Callable[[Any], str] | None = None  # which of `runs` a config writes; None: runs[0]
  rollout_runs: tuple[str, ...] = ()  # those of `runs` that read the rollouts stage
  # `dqo_jax.compare` labels beyond the method's own name: label -> config overrides.
  variants: dict[str, dict] = dataclasses.field(default_factory=dict)
  # ... and those `dqo_jax.compare --ablations` adds.
  ablations: dict[str, dict] = dataclasses.field(default_factory=dict)
  # Steps at the start of training that move only the value model (config -> steps).
  value_warmup: Callable[[Any], int] = lambda config: 0

  @property
  def all_runs(self) -> tuple[str, ...]:
    return self.runs or (self.name,)

  def run_for(self, config) -> str:
    return self.run_name(config) if self.run_name else self.all_runs[0]

  def needs_rollouts(self, config) -> bool:
    return self.run_for(config) in self.rollout_runs


@functools.cache
def registry() -> dict[str, Method]:
  """Every method module of this package, imported once: name -> Method, in `order`."""
  found = registry_lib.discover(__name__, __path__, "METHOD")
  return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def get(name: str) -> Method:
  methods = registry()
  if name not in methods:
    raise UserError(f"config.method={name!r}; choose from {', '.join(methods)}")
  return methods[name]


def of(config) -> Method:
  return get(config.method)


def run_name(config) -> str:
  """The directory and results key of a config's run; the SFT checkpoint itself is 'sft'."""
  return of(config).run_for(config)


def all_runs(sample_only: bool = False) -> tuple[str, ...]:
  """Every run directory a workdir can hold (those that read the samples, if `sample_only`)."""
  return tuple(
      r for m in registry().values() if m.reads_samples or not sample_only for r in m.all_runs
  )


def rollout_runs() -> tuple[str, ...]:
  return tuple(r for m in registry().values() for r in m.rollout_runs)


def compare_labels(ablations: bool = False) -> dict[str, dict]:
  """`dqo_jax.compare`'s labels -> config overrides: each method by name, then its variants (or,
  with `ablations`, its ablations alone)."""
  out = {} if ablations else {name: {"method": name} for name in registry()}
  for name, m in registry().items():
    extra = m.ablations if ablations else m.variants
    out.update({label: {"method": name, **o} for label, o in extra.items()})
  return out


def add_config_sections(c, beta: float) -> None:
  """config.<name> for every method that has settings of its own."""
  for name, m in registry().items():
    if m.defaults is not None:
      c[name] = m.defaults(beta)
