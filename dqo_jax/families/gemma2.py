"""Gemma 2: Gemma with norms on the attention and MLP outputs too, soft-capped attention scores
and logits, queries scaled by query_pre_attn_scalar, and sliding-window attention on even
layers."""

from __future__ import annotations

from dqo_jax.families import Family, gemma
from dqo_jax.families.llama import CORE

# Gemma 2 names its four norms differently: "post_attention" is the attention output's norm.
NORMS = (
    ("model.layers.{i}.post_attention_layernorm.weight", "layer_{i}/post_attn_norm/scale", "copy"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layer_{i}/mlp_norm/scale", "copy"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layer_{i}/post_mlp_norm/scale", "copy"),
)


def _from_hf(d: dict, fields: dict) -> dict:
  return gemma.from_hf(d, fields) | dict(
      post_norms=True,
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or fields["head_dim"]),
      attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
      final_softcap=float(d.get("final_logit_softcapping") or 0.0),
  )


def _to_hf(cfg, out: dict) -> None:
  gemma.to_hf(cfg, out)
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  out.update(
      query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
      attn_logit_softcapping=cfg.attn_softcap or None,
      final_logit_softcapping=cfg.final_softcap or None,
      sliding_window=cfg.sliding_window or None,
  )


def _layer_types(d: dict, n_layers: int) -> list[str]:
  if d.get("layer_types") is not None:
    return d["layer_types"]
  # Files from before `layer_types`: even layers slide, odd layers are global.
  return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


FAMILY = Family(
    name="gemma2",
    architecture="Gemma2ForCausalLM",
    tied_by_default=True,
    weights=CORE + NORMS,
    from_hf=_from_hf,
    to_hf=_to_hf,
    layer_types=_layer_types,
)
