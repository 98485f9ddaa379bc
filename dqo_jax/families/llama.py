"""Llama 2, 3 and 3.x: the layout the other families extend."""

from __future__ import annotations

from dqo_jax.families import Family

# Every family's embedding, final norm, attention and MLP projections.
CORE = (
    ("model.embed_tokens.weight", "embed", "copy"),
    ("model.norm.weight", "final_norm/scale", "copy"),
    ("lm_head.weight", "lm_head", "transpose"),
    ("model.layers.{i}.input_layernorm.weight", "layer_{i}/attn_norm/scale", "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layer_{i}/attn/q/kernel", "heads_out"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layer_{i}/attn/k/kernel", "heads_out"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layer_{i}/attn/v/kernel", "heads_out"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layer_{i}/attn/q/bias", "heads_bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layer_{i}/attn/k/bias", "heads_bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layer_{i}/attn/v/bias", "heads_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layer_{i}/attn/o/kernel", "heads_in"),
    ("model.layers.{i}.self_attn.o_proj.bias", "layer_{i}/attn/o/bias", "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layer_{i}/mlp/gate/kernel", "transpose"),
    ("model.layers.{i}.mlp.up_proj.weight", "layer_{i}/mlp/up/kernel", "transpose"),
    ("model.layers.{i}.mlp.down_proj.weight", "layer_{i}/mlp/down/kernel", "transpose"),
)
# The norm before the MLP, which every family but Gemma 2 names "post_attention_layernorm".
PRE_MLP_NORM = (
    ("model.layers.{i}.post_attention_layernorm.weight", "layer_{i}/mlp_norm/scale", "copy"),
)


def no_sliding_layers(cfg) -> None:
  """Refuses sliding-window layers, which the family's config.json cannot express (and the
  round trip of `hf_config_from_model_config` would not notice: it reads layer_types back)."""
  if cfg.layer_types:
    raise ValueError(f"family {cfg.family} has no sliding-window layers")


def _from_hf(d: dict, fields: dict) -> dict:
  del fields
  bias = bool(d.get("attention_bias", False))  # on q, k, v and o alike
  return dict(qkv_bias=bias, o_bias=bias)


def _to_hf(cfg, out: dict) -> None:
  out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  no_sliding_layers(cfg)


FAMILY = Family(
    name="llama",
    architecture="LlamaForCausalLM",
    tied_by_default=False,
    weights=CORE + PRE_MLP_NORM,
    from_hf=_from_hf,
    to_hf=_to_hf,
)
