"""The logical-axis rules cover every parameter and activation of every model family; a
non-divisible dimension is left whole; the token axis is never sharded. (The sharded train steps
themselves are checked against one device in test_train_step.py.)"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from dqo_jax import distributed, sharding
from dqo_jax.errors import UserError
from dqo_jax.model import ModelConfig, Transformer

RULES = common.MESH_RULES
NAMES = {name for name, _ in RULES}

BASE = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)
# What each Hugging Face family switches on (dqo_jax.hf_config sets the same fields).
FAMILIES = {
    "llama": BASE,
    "llama_untied_o_bias": dataclasses.replace(BASE, tie_embeddings=False, o_bias=True),
    "qwen2": dataclasses.replace(BASE, family="qwen2", qkv_bias=True),
    "gemma": dataclasses.replace(
        BASE, family="gemma", activation="gelu_tanh", norm_plus_one=True, embed_scale=True
    ),
    "gemma2": dataclasses.replace(
        BASE,
        family="gemma2",
        activation="gelu_tanh",
        norm_plus_one=True,
        embed_scale=True,
        post_norms=True,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=4,
        layer_types=("sliding", "global"),
    ),
}


def _boxed(cfg, head):
  t = jnp.zeros((2, 5), jnp.int32)
  model = Transformer(cfg, head=head)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), t, jnp.ones_like(t)))["params"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("head", ["lm", "value"])
def test_every_parameter_has_a_name_per_dimension_and_a_rule_per_name(family, head):
  boxed = _boxed(FAMILIES[family], head)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert is_box(leaf), f"{where} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) <= NAMES, (where, leaf.names)
  if FAMILIES[family].qkv_bias:
    q_bias = boxed["layer_0"]["attn"]["q"]["bias"]
    assert q_bias.names == ("heads", "head_dim")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_activation_constraint_names_ruled_axes(family, monkeypatch):
  seen = []
  monkeypatch.setattr(sharding, "constrain", lambda x, names: seen.append(names) or x)
  t = jnp.zeros((2, 5), jnp.int32)
  for head in ("lm", "value"):
    model = Transformer(FAMILIES[family], head=head)
    params = nn.meta.unbox(_boxed(FAMILIES[family], head))
    jax.eval_shape(lambda p: model.apply({"params": p}, t, jnp.ones_like(t)), params)
  # The embedding table is gathered whole over its embed axis; the rest are activations.
  assert ("vocab", None) in seen
  activations = [names for names in seen if names != ("vocab", None)]
  used = {n for names in activations for n in names}
  assert used <= NAMES, used - NAMES
  assert used >= {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab"}
  assert all(names[:2] == ("batch", "length") for names in activations)


def test_rules_split_activations_over_batch_only_and_never_the_tokens():
  spec = lambda *names: nn.logical_to_mesh_axes(names, RULES)
  assert spec("batch", "length", "embed") == P(("data", "fsdp"), None, None)
  assert spec("batch", "length", "heads", "head_dim") == P(("data", "fsdp"), None, "tensor", None)
  assert spec("batch", "length", "vocab") == P(("data", "fsdp"), None, "tensor")
  assert spec("embed", "mlp") == P("fsdp", "tensor")


def test_a_dimension_the_mesh_does_not_divide_is_left_whole():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])
  assert sharding.divisible_spec(P(("data", "fsdp"), "tensor"), (6, 4), mesh) == P("data", "tensor")
  assert sharding.divisible_spec(P(("data", "fsdp"), "tensor"), (4, 3), mesh) == P(
      ("data", "fsdp"), None
  )
  assert sharding.divisible_spec(P("fsdp"), (4, 3), mesh) == P("fsdp", None)


def test_constrain_places_activations_only_inside_the_context():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
  x = jnp.arange(8 * 3 * 4, dtype=jnp.float32).reshape(8, 3, 4)
  names = ("batch", "length", "heads")

  def placed(x):
    with sharding.activation_constraints(mesh, RULES):
      return sharding.constrain(x * 2, names)

  y = jax.jit(placed)(x)
  assert y.sharding.shard_shape(y.shape) == (2, 3, 2)
  np.testing.assert_array_equal(y, 2 * x)
  assert sharding.constrain(x, names) is x


def test_a_mesh_that_does_not_fit_the_devices_is_a_one_line_user_error():
  with pytest.raises(UserError, match="needs 4 devices, found 8; set one axis to -1"):
    sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:8])


def test_only_a_multi_host_tpu_environment_starts_jax_distributed():
  assert distributed.on_tpu_pod({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"})
  assert distributed.on_tpu_pod({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"})
  assert not distributed.on_tpu_pod({"TPU_WORKER_HOSTNAMES": "localhost"})
  # What libtpu writes there on a machine without a TPU.
  warning = "WARNING: could not determine TPU worker hostnames or IP addresses, please set env var"
  assert not distributed.on_tpu_pod({"TPU_WORKER_HOSTNAMES": warning})
  assert not distributed.on_tpu_pod({})
