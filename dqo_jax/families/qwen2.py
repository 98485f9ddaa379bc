"""Qwen2 and Qwen2.5: Llama with biases on the q, k and v projections, and sliding-window
attention on the layers from `max_window_layers` on when `use_sliding_window` is set."""

from __future__ import annotations

from dqo_jax.families import Family
from dqo_jax.families.llama import CORE, PRE_MLP_NORM


def _from_hf(d: dict, fields: dict) -> dict:
  del d, fields
  return dict(qkv_bias=True)


def _layer_types(d: dict, n_layers: int) -> list[str]:
  if not d.get("use_sliding_window"):
    return []  # every layer global, whatever layer_types says
  if d.get("layer_types") is not None:
    return d["layer_types"]
  start = d.get("max_window_layers", n_layers)
  return ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]


def _to_hf(cfg, out: dict) -> None:
  out["use_sliding_window"] = bool(cfg.layer_types)
  if cfg.layer_types:
    first = cfg.layer_types.index("sliding")
    if cfg.layer_types != ("global",) * first + ("sliding",) * (cfg.n_layers - first):
      raise ValueError("a Qwen2 export needs its sliding layers after its global ones")
    out["max_window_layers"] = first


FAMILY = Family(
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    tied_by_default=False,
    weights=CORE + PRE_MLP_NORM,
    from_hf=_from_hf,
    to_hf=_to_hf,
    layer_types=_layer_types,
)
