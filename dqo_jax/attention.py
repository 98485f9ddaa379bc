"""Attention kernels behind `model.attention`, for calls with more than one query token.

  * "xla" (the default): `jax.nn.dot_product_attention`, XLA's fused attention;
  * "cudnn": the same function's cuDNN flash kernel (NVIDIA GPUs, bf16/fp16 compute);
  * "einsum": the scores written out with einsum and a float32 softmax;
  * "pallas_tpu": the Pallas flash-attention kernel that ships with jax (TPU only).

All take queries [B, L, N, Dh], keys and values in the cache layout [B, K, S, Dh] (K divides N:
grouped-query attention) and a boolean mask [B, L, S]; they return [B, L, N, Dh]. The one-token
decode step does not come here: `model.Attention` keeps its own broadcast-and-sum form for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dqo_jax import sharding

IMPLS = ("xla", "cudnn", "einsum", "pallas_tpu")
PALLAS_BLOCK = 128  # the Pallas kernel tiles keys in blocks of 128 tokens


def check_impl(impl: str, *, softcap: float, sliding: bool) -> None:
  """Refuses what a kernel cannot compute, at configuration time rather than deep in a trace."""
  if impl not in IMPLS:
    raise ValueError(f"model.attention={impl!r}: expected one of {IMPLS}")
  if softcap and impl in ("cudnn", "pallas_tpu"):
    raise ValueError(f"model.attention={impl!r} has no score soft-capping (attn_softcap); use xla")
  if sliding and impl == "pallas_tpu":
    raise ValueError("model.attention='pallas_tpu' has no sliding-window layers; use xla")


def attend(q, k, v, mask, *, scale: float, softcap: float, impl: str, cached: bool):
  """softmax(q k^T * scale [softcapped], masked) v. `cached`: keys come from a KV cache, so key
  slots are not the query positions (only "xla", "cudnn" and "einsum" handle that)."""
  if impl == "einsum" or (impl == "xla" and softcap):
    # dot_product_attention has no soft-capping: Gemma 2 runs the written-out form under "xla".
    return _einsum(q, k, v, mask, scale=scale, softcap=softcap)
  if impl in ("xla", "cudnn") or cached:
    # The cache layout [B, K, S, Dh] -> dot_product_attention's [B, S, K, Dh].
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=impl if impl == "cudnn" else "xla"
    )
  return _pallas_tpu(q, k, v, mask, scale=scale)


def _einsum(q, k, v, mask, *, scale, softcap):
  b, l, n, d = q.shape
  qg = q.reshape(b, l, k.shape[1], n // k.shape[1], d)
  scores = jnp.einsum("blkgd,bksd->bkgls", qg, k).astype(jnp.float32) * scale
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgls,bksd->blkgd", probs, v).reshape(b, l, n, d)


def _pallas_tpu(q, k, v, mask, *, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top

  # Without a cache the keys are this call's tokens: the last query row of the causal mask marks
  # the real ones. Padding gets segment 0 and real tokens segment 1, so a real token attends
  # causally to real tokens only, as the mask says.
  segments = mask[:, -1, :].astype(jnp.int32)
  groups = q.shape[2] // k.shape[1]
  k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
  q = q.transpose(0, 2, 1, 3)  # [B, N, L, Dh]
  # Pad the tokens to whole blocks as segment 0: padding queries are dropped below, and real
  # tokens (segment 1) never attend to padding.
  length = q.shape[2]
  pad = -length % PALLAS_BLOCK
  q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
  segments = jnp.pad(segments, ((0, 0), (0, pad)))

  def kernel(q, k, v, segments):
    return flash_attention.flash_attention(
        q,
        k,
        v,
        segment_ids=flash_attention.SegmentIds(q=segments, kv=segments),
        causal=True,
        sm_scale=scale,
    )

  # XLA cannot partition a Mosaic kernel: on a mesh each device runs it on its own rows and heads.
  placed = sharding.logical_spec(("batch", "heads", "length", "head_dim"), q.shape)
  if placed is not None:
    mesh, spec = placed
    kernel = jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(spec, spec, spec, P(spec[0], None)),
        out_specs=spec,
        check_vma=False,
    )
  return kernel(q, k, v, segments)[:, :, :length].transpose(0, 2, 1, 3)
