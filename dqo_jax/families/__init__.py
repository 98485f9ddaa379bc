"""The Hugging Face model families, one module each, registered by `model_type` when imported.

A family module defines `FAMILY = Family(...)`: the class it exports as, whether it ties its
embeddings when `config.json` does not say, its weight map (one row per tensor), and what its
`config.json` holds beyond the keys every family shares (`from_hf`, `to_hf`). `hf_config.py` and
`convert.py` read this registry and name no family; adding one is adding a module here (and a
parity test against `transformers`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from dqo_jax import registry as registry_lib

# A weight-map row: (Hugging Face tensor name, our parameter path, rule of dqo_jax.convert.RULES);
# "{i}" stands for the layer index. Rows whose parameter a model lacks (biases, an untied
# lm_head) are skipped.
Row = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # config.json's model_type
  architecture: str  # config.json's architectures[0]
  tied_by_default: bool  # tie_word_embeddings when config.json does not say
  weights: tuple[Row, ...]
  # (config.json, the shared ModelConfig fields) -> this family's fields (biases, norms, ...).
  from_hf: Callable[[dict, dict], dict]
  # (ModelConfig, the config.json being written) -> None: adds this family's keys, and raises
  # ValueError for what the family cannot express.
  to_hf: Callable[[Any, dict], None]
  # (config.json, n_layers) -> the Hugging Face layer_types the family reads from it ([]: every
  # layer global); older files have no layer_types key.
  layer_types: Callable[[dict, int], list[str]] = lambda d, n_layers: d.get("layer_types") or []


@functools.cache
def registry() -> dict[str, Family]:
  return registry_lib.discover(__name__, __path__, "FAMILY")


def get(name: str) -> Family:
  families = registry()
  if name not in families:
    raise ValueError(
        f"config.json model_type={name!r} is not supported; supported: {', '.join(families)}"
    )
  return families[name]


def weight_map(cfg) -> dict[str, tuple[tuple[str, ...], str]]:
  """{Hugging Face name: (our parameter path, rule)} for every parameter of the LM model of
  `cfg` (a dqo_jax.model.ModelConfig), its layers spelled out."""
  out = {}
  for hf, ours, rule in get(cfg.family).weights:
    for i in range(cfg.n_layers) if "{i}" in hf else [None]:
      out[hf.format(i=i)] = (tuple(ours.format(i=i).split("/")), rule)
  return out
