"""`model.scan_layers`: the decoder blocks under nn.scan, their parameters stacked on a "layers"
axis, compute what the unrolled blocks compute, and the layout is either read or refused in one
line wherever parameters cross a boundary (checkpoints, LoRA)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dqo_jax import lora
from dqo_jax.checkpoint import Checkpoints, restore_params
from dqo_jax.errors import UserError
from dqo_jax.model import ModelConfig, Transformer, init_cache, stack_layers, unstack_layers
from dqo_jax.sampler import generate

PLAIN = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8)
# Gemma 2's per-layer choice (sliding and global layers alternate) is a flag scanned per layer.
GEMMA2 = dataclasses.replace(
    PLAIN,
    n_layers=4,
    layer_types=("sliding", "global", "sliding", "global"),
    sliding_window=3,
    post_norms=True,
    attn_softcap=5.0,
)
EOS, PAD = 3, 0


def _batch():
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 10), 4, 40), np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0  # a left-padded prompt
  return np.where(mask, tokens, PAD), mask


def _per_layer_params(cfg):
  tokens, mask = _batch()
  return nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens, mask)["params"])


@pytest.mark.parametrize("cfg", [PLAIN, GEMMA2], ids=["llama", "gemma2"])
def test_scanned_blocks_give_the_unrolled_logits_caches_gradients_and_decoding(cfg):
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  params = _per_layer_params(cfg)
  stacked = stack_layers(params, cfg.n_layers)
  tokens, mask = _batch()
  # The scanned model's own init lays its parameters out as stack_layers does.
  init = Transformer(scanned_cfg).init(jax.random.key(0), tokens, mask)["params"]
  assert jax.tree.structure(nn.meta.unbox(init)) == jax.tree.structure(stacked)
  assert init["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "heads", "head_dim")

  logprobs = lambda model, p: model.apply(
      {"params": p}, tokens, mask, targets=tokens[:, 1:], first_output=1
  )[0]
  want = logprobs(Transformer(cfg), params)
  for remat in ("none", "full"):
    got = logprobs(Transformer(scanned_cfg, remat=remat), stacked)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # A call with a KV cache (prefill, then one token) reads each layer out of the stack.
  cached = lambda model, p: model.apply(
      {"params": p}, tokens, mask, cache=init_cache(cfg, len(tokens), tokens.shape[1] + 1)
  )
  (want_logits, want_cache), (got_logits, got_cache) = (
      cached(Transformer(cfg), params),
      cached(Transformer(scanned_cfg), stacked),
  )
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), got_cache, want_cache)
  if cfg is GEMMA2:
    return
  loss = lambda model, p: jnp.sum(logprobs(model, p) * mask[:, 1:])
  g_want = jax.jit(jax.grad(lambda p: loss(Transformer(cfg), p)))(params)
  g_got = jax.jit(jax.grad(lambda p: loss(Transformer(scanned_cfg, remat="full"), p)))(stacked)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
      g_got,
      stack_layers(g_want, cfg.n_layers),
  )
  # The sampler unstacks the layers before its decode loop. Sampled, on the same key: equal
  # tokens mean equal decoding, and the log-probs agree.
  decode = lambda model, p: generate(
      model, p, tokens, mask, jax.random.key(2), max_new_tokens=6, eos_id=EOS, pad_id=PAD
  )
  a, b = decode(Transformer(cfg), params), decode(Transformer(scanned_cfg), stacked)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, rtol=0)


def test_stacking_and_unstacking_are_inverse():
  params = _per_layer_params(PLAIN)
  stacked = stack_layers(params, PLAIN.n_layers)
  assert set(stacked) == {"embed", "final_norm", "layers"}
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert unstack_layers(params) is params


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_checkpoint_of_the_other_layout_is_refused_in_one_line(tmp_path, saved_scanned):
  params = _per_layer_params(PLAIN)
  stacked = stack_layers(params, PLAIN.n_layers)
  saved, wanted = (stacked, params) if saved_scanned else (params, stacked)
  ckpt = Checkpoints(tmp_path / "ckpt", every=1)
  assert ckpt.save(1, {"params": saved}, force=True)
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": wanted})
  with pytest.raises(UserError) as e:
    restore_params(tmp_path / "ckpt", abstract)
  assert "\n" not in str(e.value)
  assert f"--config.model.scan_layers={saved_scanned}" in str(e.value)
  restored = restore_params(
      tmp_path / "ckpt",
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": saved}),
  )
  jax.tree.map(np.testing.assert_array_equal, restored["params"], saved)


def test_lora_adapters_stack_with_the_layers_and_fold_into_them():
  cfg = dataclasses.replace(PLAIN, scan_layers=True)
  lora_cfg = ml_collections.ConfigDict(lora.defaults() | dict(rank=2, targets="q,down"))
  tokens, mask = _batch()
  adapted = lora.adapt(Transformer(cfg), lora_cfg, quantized=False)
  params = nn.meta.unbox(adapted.init(jax.random.key(0), tokens, mask)["params"])
  assert params["layers"]["attn"]["q"]["kernel_lora_a"].shape == (cfg.n_layers, 32, 2)
  assert params["layers"]["mlp"]["down"]["kernel_lora_b"].shape == (cfg.n_layers, 2, 32)
  # B starts at zero: give it values, so that folding has something to fold.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if path[-1].key.endswith("_lora_b") else x, params
  )
  want = adapted.apply({"params": params}, tokens, mask)[0]
  got = Transformer(cfg).apply({"params": lora.fold(params, lora_cfg)}, tokens, mask)[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert (
      float(
          jnp.abs(
              want - Transformer(cfg).apply({"params": lora.split(params)[0]}, tokens, mask)[0]
          ).max()
      )
      > 1e-3
  )


def test_a_quantized_lora_base_over_scanned_layers_is_refused_in_one_line():
  from configs.arith import get_config  # pylint: disable=g-import-not-at-top

  config = get_config("tiny")
  config.model.scan_layers = True
  config.model.lora.update(rank=4, base_qtype="int8")
  with pytest.raises(UserError, match="--config.model.scan_layers=False"):
    lora.check(config)
