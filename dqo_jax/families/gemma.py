"""Gemma 1: RMSNorm scaling by (1 + scale), embeddings times sqrt(d_model), GeGLU, tied
embeddings, no attention biases."""

from __future__ import annotations

from dqo_jax.families import Family
from dqo_jax.families.llama import CORE, PRE_MLP_NORM, no_sliding_layers


def from_hf(d: dict, fields: dict) -> dict:
  del d, fields
  return dict(norm_plus_one=True, embed_scale=True)


def to_hf(cfg, out: dict) -> None:
  del cfg
  out["hidden_activation"] = out["hidden_act"]


def _to_hf(cfg, out: dict) -> None:
  to_hf(cfg, out)
  no_sliding_layers(cfg)


FAMILY = Family(
    name="gemma",
    architecture="GemmaForCausalLM",
    tied_by_default=True,
    weights=CORE + PRE_MLP_NORM,
    from_hf=from_hf,
    to_hf=_to_hf,
)
