"""A config saved as JSON by a run (DIR/config.json), to rerun it exactly.

    python -m dqo_jax.main --config=configs/from_json.py:/tmp/run/config.json --workdir=/tmp/rerun

`python -m dqo_jax.compare` starts each of its runs this way, from the one config it was given.
"""

import json

import ml_collections


def _tuples(x):
  # JSON has no tuples; the mesh rules are pairs.
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def get_config(path: str):
  if not path:
    raise ValueError(
        "configs/from_json.py needs a path: --config=configs/from_json.py:DIR/config.json"
    )
  with open(path) as f:
    raw = json.load(f)
  raw["mesh"]["rules"] = _tuples(raw["mesh"]["rules"])
  return ml_collections.ConfigDict(raw)
