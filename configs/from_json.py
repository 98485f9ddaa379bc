"""A config saved as JSON by a run (DIR/config.json), to rerun it exactly.

    python -m dqo_jax.main --config=configs/from_json.py:/tmp/run/config.json --workdir=/tmp/rerun

`python -m dqo_jax.compare` starts each of its runs this way, from the one config it was given.
"""

import json

import ml_collections

from dqo_jax import config_keys


def _tuples(x):
  # JSON has no tuples; the mesh rules are pairs.
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _missing_keys(raw: dict) -> list[str]:
  """Keys that the task's own config file has and `raw` lacks: a config.json written by an
  older dqo_jax. The model section is left out: its fields differ between presets, and the
  code reads the newer ones with defaults."""
  known = config_keys.preset_keys(raw.get("data", {}).get("task", ""))
  return sorted(known - config_keys.leaves(raw)) if known else []


def get_config(path: str):
  if not path:
    raise ValueError(
        "configs/from_json.py needs a path: --config=configs/from_json.py:DIR/config.json"
    )
  with open(path) as f:
    raw = json.load(f)
  missing = _missing_keys(raw)
  if missing:
    raise ValueError(
        f"{path} lacks {', '.join(missing)} (written by an older dqo_jax): add them to it, or "
        f"start from configs/{raw['data']['task']}.py"
    )
  raw["mesh"]["rules"] = _tuples(raw["mesh"]["rules"])
  return ml_collections.ConfigDict(raw)
