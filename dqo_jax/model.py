"""A Llama-style decoder in Flax: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

One configurable network covers the embedded model and the Hugging Face families Llama 2/3.x,
Qwen2/2.5 and Gemma 1/2 (`dqo_jax.hf_config.model_config_from_hf`; the weight maps are in
`dqo_jax.convert`).
One network serves as the policy (language-model head) and as the value model (scalar head).
Every parameter carries logical axis names ("vocab", "embed", "heads", "kv_heads", "head_dim",
"mlp"), and activations are constrained at block boundaries by the same names plus "batch" and
"length" (`_constrain`); `dqo_jax.sharding` maps them onto the device mesh.

Layout conventions used everywhere in the project:
  * a sequence is [left-padded prompt | right-padded response]; `attention_mask` [B, L] marks
    real tokens, and positions are `cumsum(attention_mask) - 1`, so a token's rotary position
    does not depend on how much padding precedes it;
  * the KV cache holds one array per layer for keys and for values, laid out
    [batch, kv_heads, cache_len, head_dim]
    (measured here 3.2x faster to decode than [batch, seq, heads, head_dim]) plus `key_mask`
    [batch, cache_len] marking which cache slots hold real tokens.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqo_jax import attention, sharding
from dqo_jax.losses import token_logprobs

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 384
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype; parameters stay float32
  # Family features. The defaults are the embedded Llama-style model; `from_hf` sets them.
  family: str = "llama"  # the Hugging Face architecture an export writes: llama|qwen2|gemma|gemma2
  activation: str = "silu"  # gated MLP: "silu" (SwiGLU), "gelu_tanh" (GeGLU) or "gelu"
  qkv_bias: bool = False  # Qwen2: biases on the q, k, v projections
  o_bias: bool = False  # Llama with attention_bias: a bias on the output projection as well
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + scale), scale initialised at 0
  post_norms: bool = False  # Gemma 2: RMSNorm on the attention and MLP outputs too
  embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
  query_pre_attn_scalar: float = 0.0  # Gemma 2: scores scaled by this**-0.5 (0: head_dim)
  attn_softcap: float = 0.0  # Gemma 2: scores -> cap * tanh(scores / cap) (0: off)
  final_softcap: float = 0.0  # Gemma 2: logits -> cap * tanh(logits / cap) (0: off)
  sliding_window: int = 0  # keys within this many slots of the query on "sliding" layers
  layer_types: tuple[str, ...] = ()  # per layer "global" or "sliding"; () = all global
  rope_type: str = "default"  # "default", "linear" (positions / factor) or "llama3" (Llama 3.1)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  attention: str = "xla"  # the kernel of multi-token calls: dqo_jax.attention.IMPLS
  # The decoder blocks under nn.scan: one block's program, its parameters stacked on a leading
  # "layers" axis (params["layers"]), instead of n_layers unrolled copies (params["layer_{i}"]).
  scan_layers: bool = False

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
      )
    attention.check_impl(
        self.attention, softcap=self.attn_softcap, sliding="sliding" in self.layer_types
    )
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"model.activation={self.activation!r}: expected one of {_ACTIVATIONS}")
    if self.rope_type not in ("default", "linear", "llama3"):
      raise ValueError(f"model.rope_type={self.rope_type!r}: expected default, linear or llama3")
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if self.layer_types and (
        len(self.layer_types) != self.n_layers or not set(self.layer_types) <= {"global", "sliding"}
    ):
      raise ValueError(
          f"model.layer_types={self.layer_types}: need {self.n_layers} of 'global'/'sliding'"
      )
    if "sliding" in self.layer_types and self.sliding_window <= 0:
      raise ValueError("model.layer_types has sliding layers but model.sliding_window is not set")

  @classmethod
  def from_config(cls, cfg, vocab_size: int) -> "ModelConfig":
    """Builds from an ml_collections `config.model`; the vocabulary comes from the tokenizer.

    The keys in RUN_KEYS are not architecture fields and are left to their readers; any other
    key that is not a field is refused (`unknown_config_keys`).
    """
    unknown = unknown_config_keys(cfg)
    if unknown:
      raise ValueError(f"config.model has no field {unknown[0]}")
    return cls(
        vocab_size=vocab_size, **{k: _frozen(v) for k, v in cfg.items() if k not in RUN_KEYS}
    )

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {"layer_types": list(self.layer_types)}

  @classmethod
  def from_json(cls, d: dict) -> "ModelConfig":
    return cls(**{k: _frozen(v) for k, v in d.items()})

  def layer_type(self, i: int) -> str:
    return self.layer_types[i] if self.layer_types else "global"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# Keys of `config.model` that are not architecture fields: where a pretrained model lives
# (`path`, read by `dqo_jax.convert.load_pretrained`; `hf_repo` and `name`, which describe a
# preset) and how it trains (`remat`, `logprob_chunk`, `lora`).
RUN_KEYS = ("path", "name", "hf_repo", "remat", "logprob_chunk", "lora")


# Fields of `config.model` that a pretrained model takes from the run's config as well: how it
# computes, not what (its config.json fixes the architecture).
PRETRAINED_OVERRIDES = ("dtype", "attention", "scan_layers")


def with_overrides(cfg: ModelConfig, model_config) -> ModelConfig:
  """A pretrained model's `cfg` with the PRETRAINED_OVERRIDES that `model_config` (the run's
  `config.model`) sets."""
  return dataclasses.replace(
      cfg, **{k: model_config[k] for k in PRETRAINED_OVERRIDES if k in model_config}
  )


def unknown_config_keys(cfg) -> list[str]:
  """The keys of `config.model` that are neither ModelConfig fields nor RUN_KEYS, each as
  'key' or 'key (did you mean "field"?)'."""
  known = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
  known += RUN_KEYS
  out = []
  for key in cfg:
    if key not in known:
      near = difflib.get_close_matches(key, known, n=1)
      out.append(f"{key} (did you mean {near[0]!r}?)" if near else key)
  return out


# `model.remat`: what a decoder block keeps for the backward pass; the rest is recomputed there.
# "full" keeps only each block's input (least memory, one more forward pass); "dots" keeps the
# outputs of the weight matmuls and recomputes attention and the element-wise ops.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _frozen(v):
  """Lists (from JSON or ml_collections) as tuples, so the config stays hashable."""
  return tuple(v) if isinstance(v, list) else v


def _init(names, init=nn.initializers.normal(0.02)):
  return nn.with_logical_partitioning(init, names)


def _constrain(x, *names):
  """Pins an activation [batch, length, *names] to the mesh (a no-op outside
  `dqo_jax.sharding.activation_constraints`), so XLA keeps the batch split and tensor-parallel
  axes where the rules say instead of guessing."""
  return sharding.constrain(x, ("batch", "length", *names))


class RMSNorm(nn.Module):
  eps: float
  plus_one: bool = False  # Gemma: y * (1 + scale), the stored scale starting at 0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", _init(("embed",), init), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    # Normalise in float32: bf16 mean-of-squares loses the small activations.
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      scale = 1.0 + scale.astype(jnp.float32)
    return (y * scale).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, half: int):
  """Rotary inverse frequencies [half], with Llama 3.1's ("llama3") or linear scaling."""
  freqs = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_type == "linear":
    freqs = freqs / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old = cfg.rope_original_max_position
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / freqs
    scaled = jnp.where(wavelen > low_wavelen, freqs / cfg.rope_factor, freqs)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    freqs = jnp.where(medium, smoothed, scaled)
  return freqs


def rotary(x, positions, theta_or_cfg):
  """Rotates the two halves of the head dimension. x: [B, L, H, Dh], positions: [B, L].

  `theta_or_cfg` is the rotary base, or a `ModelConfig` (base and scaling).
  """
  half = x.shape[-1] // 2
  if isinstance(theta_or_cfg, ModelConfig):
    freqs = rope_frequencies(theta_or_cfg, half)
  else:
    freqs = theta_or_cfg ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, L, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, kv: tuple[jax.Array, jax.Array] | None, cache_index):
    """x: [B, L, D]; mask: [B, L, S] boolean; kv: this layer's cache ([B, K, S, Dh] each) or None.

    Returns the output and the updated (k, v) cache for this layer (None when there is none).
    """
    c = self.cfg
    dense = lambda feats, names, name: nn.DenseGeneral(
        feats,
        axis=-1,
        use_bias=c.qkv_bias,
        dtype=c.compute_dtype,
        kernel_init=_init(names),
        bias_init=_init(names[1:], nn.initializers.zeros),
        name=name,
    )
    q = dense((c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), "q")(x)
    k = dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k")(x)
    v = dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v")(x)
    q = _constrain(q, "heads", "head_dim")
    k, v = (_constrain(a, "kv_heads", "head_dim") for a in (k, v))
    q, k = rotary(q, positions, c), rotary(k, positions, c)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, L, Dh]
    if kv is not None:
      k = write_slots(kv[0], k.astype(kv[0].dtype), cache_index, axis=2)
      v = write_slots(kv[1], v.astype(kv[1].dtype), cache_index, axis=2)
    b, l = x.shape[:2]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    if l == 1:
      out = _decode_attention(q, k, v, mask, scale=scale, softcap=c.attn_softcap)
    else:
      out = attention.attend(
          q,
          k,
          v,
          mask,
          scale=scale,
          softcap=c.attn_softcap,
          impl=c.attention,
          cached=kv is not None,
      )
    out = _constrain(out.reshape(b, l, c.n_heads, c.head_dim), "heads", "head_dim")
    out = nn.DenseGeneral(
        c.d_model,
        axis=(-2, -1),
        use_bias=c.o_bias,
        dtype=c.compute_dtype,
        kernel_init=_init(("heads", "head_dim", "embed")),
        bias_init=_init(("embed",), nn.initializers.zeros),
        name="o",
    )(out)
    return out, None if kv is None else (k, v)


def write_slots(buf, new, index, *, axis: int):
  """`new` written into `buf` at slot `index` along `axis` (batch first): one index for every
  row, or [B] indices, each row its own (the refilled decoder's rows are at different steps)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=axis)
  one_row = lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1)
  return jax.vmap(one_row)(buf, new, index)


def _decode_attention(q, k, v, mask, *, scale, softcap):
  """One query token: q [B, 1, N, Dh], k and v [B, K, S, Dh], mask [B, 1, S] -> [B, 1, N, Dh].

  XLA:CPU runs these tiny batched matmuls ~3x slower than the same products written as
  broadcast-multiply-and-sum (measured at batch 256, cache 128).
  """
  b, _, n, d = q.shape
  qg = q.reshape(b, k.shape[1], n // k.shape[1], d)
  scores = jnp.sum(qg[:, :, :, None, :] * k[:, :, None], -1).astype(jnp.float32) * scale
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.sum(probs[..., None] * v[:, :, None], -2).reshape(b, 1, n, d)


def _activation(name: str):
  return {
      "silu": nn.silu,
      "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
      "gelu": lambda x: nn.gelu(x, approximate=False),
  }[name]


class SwiGLU(nn.Module):
  """The gated MLP: act(x W_gate) * (x W_up) W_down; SwiGLU with silu, GeGLU with gelu."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    dense = lambda feats, names, name: nn.Dense(
        feats, use_bias=False, dtype=c.compute_dtype, kernel_init=_init(names), name=name
    )
    act = _activation(c.activation)
    h = act(dense(c.d_ff, ("embed", "mlp"), "gate")(x)) * dense(c.d_ff, ("embed", "mlp"), "up")(x)
    return dense(c.d_model, ("mlp", "embed"), "down")(_constrain(h, "mlp"))


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, sliding, positions, masks, kv=None, cache_index=0):
    """x: [B, L, D]; sliding: whether this is a sliding-window layer (a traced flag under
    nn.scan); masks: (global mask, sliding mask or None), each [B, L, S]. Returns x and this
    layer's cache (None without one)."""
    c = self.cfg
    mask = masks[0] if masks[1] is None else jnp.where(sliding, masks[1], masks[0])
    norm = lambda name: RMSNorm(c.norm_eps, c.norm_plus_one, name=name)
    h, kv = Attention(c, name="attn")(norm("attn_norm")(x), positions, mask, kv, cache_index)
    if c.post_norms:
      h = norm("post_attn_norm")(h)
    x = x + h
    h = SwiGLU(c, name="mlp")(norm("mlp_norm")(x))
    if c.post_norms:
      h = norm("post_mlp_norm")(h)
    return _constrain(x + h, "embed"), kv


class Transformer(nn.Module):
  """Decoder with a language-model head (`head="lm"`) or a scalar value head (`head="value"`).

  The two share parameter names below the head, so a value model can start from a policy's
  trunk (`value_params_from_policy`).
  """

  cfg: ModelConfig
  head: str = "lm"
  remat: str = "none"  # a key of REMAT_POLICIES; applies to calls without a cache (training)
  # > 0: calls given `targets` project the vocabulary this many positions at a time.
  logprob_chunk: int = 0

  @nn.compact
  def __call__(
      self,
      tokens,
      attention_mask,
      cache: Cache | None = None,
      cache_index=0,
      targets=None,
      first_output: int = 0,
  ):
    """tokens, attention_mask: [B, L]. Returns (out, cache).

    out is logits [B, L, V] for the LM head or values [B, L] for the value head; position i's
    output is computed from tokens <= i. Without `cache`, attention is causal over this call's
    tokens and the returned cache is None. With `cache`, this call's keys are written at slots
    [cache_index, cache_index + L) and queries attend to every earlier real slot; cache_index is
    one slot for every row, or [B] slots, each row its own.

    `first_output` (static): only positions >= it get an output, [B, L - first_output, ...]; the
    earlier ones (a prompt's) still feed attention but skip the head. `targets` [B, L -
    first_output] (LM head): out is log pi(targets) [B, L - first_output] float32 instead of the
    logits, computed `logprob_chunk` positions at a time when that is set, so that the float32
    [B, L, V] logits never exist whole, in the forward or the backward pass.
    """
    c = self.cfg
    embed = self.param("embed", _init(("vocab", "embed")), (c.vocab_size, c.d_model))
    # Gathered whole over fsdp first (as FSDP does for every weight): scattering the gradient into
    # a table split over embed would first replicate the [B, L, D] cotangent on every device.
    x = sharding.constrain(embed, ("vocab", None))[tokens].astype(c.compute_dtype)
    if c.embed_scale:
      # Rounded to the compute dtype first, as the reference Gemma does (55.4256 -> 55.5 in bf16).
      x = x * jnp.asarray(c.d_model**0.5, c.compute_dtype)
    x = _constrain(x, "embed")
    if cache is None:
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      slots = query_slots = jnp.arange(tokens.shape[1])
      causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
      mask = causal[None] & attention_mask.astype(bool)[:, None, :]
    else:
      key_mask = write_slots(cache["key_mask"], attention_mask.astype(bool), cache_index, axis=1)
      positions = cache["next_position"][:, None] + jnp.cumsum(attention_mask, axis=-1) - 1
      positions = jnp.maximum(positions, 0)
      slots = jnp.arange(key_mask.shape[1])
      # [L], or [B, L] when each row has its own cache_index.
      query_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(tokens.shape[1])
      mask = (slots <= query_slots[..., None]) & key_mask[:, None, :]
    sliding_mask = None
    if "sliding" in c.layer_types:
      # Sliding layers see the keys fewer than `sliding_window` slots back (as Hugging Face).
      sliding_mask = mask & ((query_slots[..., None] - slots) < c.sliding_window)
    masks = (mask, sliding_mask)
    sliding = [c.layer_type(i) == "sliding" for i in range(c.n_layers)]
    block = Block
    if cache is None and self.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not c.scan_layers)
    kvs = []
    if c.scan_layers and cache is None:
      layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast),
          length=c.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = layers(c, name="layers")(x, jnp.asarray(sliding), positions, masks)
    else:
      for i in range(c.n_layers):
        kv = None if cache is None else (cache["k"][i], cache["v"][i])
        if c.scan_layers:
          # A call with a cache reads layer i out of the stack, so that the caches stay one
          # buffer per layer (below). The sampler's decode loops unstack once, outside the loop.
          p = jax.tree.map(lambda a: a[i], self.variables["params"]["layers"])
          x, kv = Block(c, parent=None).apply(
              {"params": p}, x, sliding[i], positions, masks, kv, cache_index
          )
        else:
          x, kv = block(c, name=f"layer_{i}")(x, sliding[i], positions, masks, kv, cache_index)
        kvs.append(kv)
    # Per-layer arrays, not one stacked array: stacking would copy the whole cache every
    # decode step, while separate buffers are updated in place inside the while loop.
    x = RMSNorm(c.norm_eps, c.norm_plus_one, name="final_norm")(x)[:, first_output:]
    if self.head == "value":
      # Zero-initialised so a value model built on a trained trunk starts at V = 0.
      w = self.param("value_head", _init(("embed",), nn.initializers.zeros), (c.d_model,))
      out = _constrain(jnp.einsum("bld,d->bl", x.astype(jnp.float32), w))
    else:
      if c.tie_embeddings:
        w = embed.T
      else:
        w = self.param("lm_head", _init(("embed", "vocab")), (c.d_model, c.vocab_size))

      def logits(h):
        z = jnp.einsum("bld,dv->blv", h, w.astype(h.dtype)).astype(jnp.float32)
        z = c.final_softcap * jnp.tanh(z / c.final_softcap) if c.final_softcap else z
        return _constrain(z, "vocab")

      if targets is None:
        out = logits(x)
      else:
        out = _constrain(_target_logprobs(logits, x, targets, self.logprob_chunk))
    if cache is None:
      return out, None
    new_cache = dict(
        k=tuple(k for k, _ in kvs),
        v=tuple(v for _, v in kvs),
        key_mask=key_mask,
        next_position=cache["next_position"] + attention_mask.sum(-1),
    )
    return out, new_cache


def _target_logprobs(logits, x, targets, chunk: int):
  """log softmax(logits(x))[targets]: x [B, L, D], targets [B, L] -> [B, L] float32.

  With 0 < chunk < L the positions go through `logits` in chunks of `chunk` under `lax.map`, each
  chunk rematerialised in the backward pass: one chunk's [B, chunk, V] logits live at a time,
  for one more vocabulary projection in the backward pass.
  """
  b, length, d = x.shape
  if not 0 < chunk < length:
    return token_logprobs(logits(x), targets)
  n = -(-length // chunk)
  pad = n * chunk - length
  # [n, B, chunk, ...]: the token axis, never sharded, is the one scanned over.
  xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  one = jax.checkpoint(lambda xt: token_logprobs(logits(xt[0]), xt[1]))
  return jax.lax.map(one, (xs, ts)).swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return dict(
      k=zeros(),
      v=zeros(),
      key_mask=jnp.zeros((batch, length), bool),
      next_position=jnp.zeros((batch,), jnp.int32),
  )


def policy_trunk(policy_params: Any) -> Any:
  """The policy's parameters without its language-model head: what the value model shares."""
  return {k: v for k, v in policy_params.items() if k != "lm_head"}


def value_params_from_policy(policy_params: Any, value_init_params: Any) -> Any:
  """The value model's parameters: the policy's trunk plus the value model's fresh head."""
  return {**policy_trunk(policy_params), "value_head": value_init_params["value_head"]}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def stack_layers(params: dict, n_layers: int) -> dict:
  """Per-layer parameters ("layer_0" ... ) -> the scanned layout: "layers", every leaf stacked on
  a new leading axis. Unboxed trees; anything else is kept."""
  names = [f"layer_{i}" for i in range(n_layers)]
  rest = {k: v for k, v in params.items() if k not in names}
  return rest | {"layers": jax.tree.map(lambda *a: jnp.stack(a), *(params[n] for n in names))}


def unstack_layers(params: dict) -> dict:
  """The scanned layout -> per-layer parameters; a tree without "layers" is returned as is."""
  if "layers" not in params:
    return params
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "layers"}
  return rest | {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}
