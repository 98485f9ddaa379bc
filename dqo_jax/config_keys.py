"""The settings a config may hold: those of its task's preset, `configs/<task>.py` (every preset
builds on `configs/common.py`'s base config). A key beyond them is a typo or a setting this
version does not read, and is refused before anything runs; `config.model` is checked against the
architecture's fields instead (`dqo_jax.model.unknown_config_keys`), since its keys differ
between presets."""

from __future__ import annotations

import difflib
import importlib


def leaves(tree: dict, prefix: str = "") -> set[str]:
  """The dotted names of a nested dict's values, e.g. {"train.steps", "dqo.process.alpha"}."""
  out = set()
  for k, v in tree.items():
    out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
  return out


def preset_keys(task: str) -> set[str] | None:
  """The leaves of the task's preset without its model section; None for a task the
  repository ships no preset for (then nothing is checked)."""
  try:
    module = importlib.import_module(f"configs.{task}")
  except ModuleNotFoundError:
    return None
  preset = module.get_config().to_dict()
  preset.pop("model", None)
  return leaves(preset)


def unknown_keys(config) -> list[str]:
  """Each key of `config` outside `config.model` that the task's preset lacks, as 'key' or
  'key (did you mean "name"?)'."""
  raw = config.to_dict()
  raw.pop("model", None)
  known = preset_keys(config.data.task)
  if known is None:
    return []
  out = []
  for key in sorted(leaves(raw) - known):
    near = difflib.get_close_matches(key, sorted(known), n=1)
    out.append(f"{key} (did you mean {near[0]!r}?)" if near else key)
  return out
