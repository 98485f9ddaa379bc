"""Hugging Face `config.json` <-> `ModelConfig`: the keys every family shares; each family's own
are in `dqo_jax/families/`.

Reads both the older keys (`rope_theta`, `rope_scaling`, no `layer_types`) and the newer ones
(`rope_parameters`, `layer_types`); writes the older ones, which every reader understands.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dqo_jax import families
from dqo_jax.model import ModelConfig

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}

# The architecture keys of the public `config.json` of models the presets name, so that
# `--compile_only` can size a step without a download (token ids and other keys left out).
_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0)
KNOWN_CONFIGS = {
    "Qwen/Qwen2-0.5B": _QWEN2
    | dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2-1.5B": _QWEN2
    | dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2-7B": _QWEN2
    | dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "google/gemma-7b": dict(
        model_type="gemma",
        hidden_act="gelu",
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
        vocab_size=256000,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
    ),
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama",
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    ),
}


def read_hf_config(config) -> dict[str, Any]:
  """`config` as a dict: a dict already, a `config.json` path, or the directory holding one."""
  if isinstance(config, dict):
    return dict(config)
  path = os.fspath(config)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (a Hugging Face model directory has one)")
  with open(path) as f:
    return json.load(f)


def model_config_from_hf(config, dtype: str = "float32") -> ModelConfig:
  d = read_hf_config(config)
  family = families.get(d.get("model_type"))
  if d.get("mlp_bias"):
    raise ValueError("config.json mlp_bias=true is not supported")
  d_model, n_heads = d["hidden_size"], d["num_attention_heads"]
  gemma = family.name.startswith("gemma")
  act = (gemma and d.get("hidden_activation")) or d.get("hidden_act", "silu")
  if gemma and act == "gelu" and not d.get("hidden_activation"):
    # Gemma 1's first configs said "gelu" for what the reference computes in the tanh form.
    act = "gelu_pytorch_tanh"
  if act not in _ACTIVATIONS:
    raise ValueError(f"config.json hidden_act={act!r} is not supported")
  fields: dict[str, Any] = dict(
      vocab_size=d["vocab_size"],
      d_model=d_model,
      n_layers=d["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=d.get("num_key_value_heads") or n_heads,
      head_dim=d.get("head_dim") or d_model // n_heads,
      d_ff=d["intermediate_size"],
      norm_eps=d.get("rms_norm_eps", 1e-6),
      tie_embeddings=d.get("tie_word_embeddings", family.tied_by_default),
      dtype=dtype,
      family=family.name,
      activation=_ACTIVATIONS[act],
  )
  fields.update(_rope_fields(d))
  fields.update(family.from_hf(d, fields))
  fields.update(_window_fields(d, family.layer_types(d, fields["n_layers"])))
  return ModelConfig(**fields)


def _rope_fields(d: dict) -> dict[str, Any]:
  params = d.get("rope_parameters") or {}
  theta = d.get("rope_theta", params.get("rope_theta", 10_000.0))
  scaling = d.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=kind)
  if kind == "default":
    return out
  if kind == "linear":
    return out | dict(rope_factor=float(scaling["factor"]))
  if kind == "llama3":
    return out | dict(
        rope_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_position=int(scaling["original_max_position_embeddings"]),
    )
  raise ValueError(
      f"config.json rope scaling type {kind!r} is not supported (default, linear, llama3)"
  )


def _window_fields(d: dict, types: list[str]) -> dict[str, Any]:
  unknown = set(types) - {"sliding_attention", "full_attention"}
  if unknown:
    raise ValueError(f"config.json layer_types {sorted(unknown)} are not supported")
  if "sliding_attention" not in types:
    return {}
  return dict(
      sliding_window=int(d.get("sliding_window") or 0),
      layer_types=tuple("sliding" if t == "sliding_attention" else "global" for t in types),
  )


def hf_config_from_model_config(cfg: ModelConfig, base: dict | None = None) -> dict[str, Any]:
  """A `config.json` for `cfg`: `base` (the imported model's config, for its token ids and other
  keys we do not model) with every architecture key set from `cfg`. ValueError when the family
  cannot express `cfg` (the file would read back as another model)."""
  try:
    family = families.get(cfg.family)
  except ValueError:
    raise ValueError(
        f"model.family={cfg.family!r}: export supports {', '.join(families.registry())}"
    ) from None
  out = dict(base or {})
  for stale in ("rope_parameters", "rope_scaling", "layer_types", "torch_dtype", "dtype"):
    out.pop(stale, None)
  out.update(
      architectures=[family.architecture],
      model_type=family.name,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
      intermediate_size=cfg.d_ff,
      rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_embeddings,
      hidden_act=_HF_ACTIVATIONS[cfg.activation],
  )
  out.setdefault("max_position_embeddings", 8192)
  if cfg.layer_types:
    out["layer_types"] = [
        "sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types
    ]
    out["sliding_window"] = cfg.sliding_window
  if cfg.rope_type == "linear":
    out["rope_scaling"] = dict(rope_type="linear", factor=cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    out["rope_scaling"] = dict(
        rope_type="llama3",
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
    )
  family.to_hf(cfg, out)
  back = model_config_from_hf(out, cfg.dtype)
  for f in dataclasses.fields(ModelConfig):
    if f.name != "attention" and _effective(back, f.name) != _effective(cfg, f.name):
      raise ValueError(
          f"a {family.name} config.json cannot express model.{f.name}={getattr(cfg, f.name)!r} "
          f"(it would read back as {getattr(back, f.name)!r})"
      )
  return out


def _effective(cfg: ModelConfig, name: str):
  """A field's value as the model uses it (query_pre_attn_scalar 0 means head_dim)."""
  if name == "query_pre_attn_scalar":
    return float(cfg.query_pre_attn_scalar or cfg.head_dim)
  return getattr(cfg, name)
