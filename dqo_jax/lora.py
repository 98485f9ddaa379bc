"""LoRA adapters over one frozen base (`config.model.lora`), through Google's qwix.

qwix wraps the Transformer so that each targeted projection computes x W + (alpha / rank) x A B
with two new parameters beside its kernel, `kernel_lora_a` [in, rank] and `kernel_lora_b`
[rank, out] (the kernel's input and output axes flattened), boxed with the kernel's logical axis
names, so they shard by the same rules. B starts at zero: an adapted model starts equal to its
base. A run with adapters trains only them (and a value model's scalar head); the base, the SFT
policy, is held once and shared by the policy and the value model, and it is also the reference
policy. `fold` writes the adapters into the kernels for sampling and export.

With `base_qtype` (QLoRA) the targeted kernels of the base are stored quantized by qwix (int8,
int4 or NF4, per output channel or in tiles of `base_tile_size` input rows) and dequantized in
each forward pass; the adapters, norms, embedding and value head stay float.
"""

from __future__ import annotations

import difflib

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import qwix

from dqo_jax.errors import UserError

# Target names (`model.lora.targets`) -> module paths in dqo_jax.model.Transformer.
TARGETS = {
    "q": "attn/q",
    "k": "attn/k",
    "v": "attn/v",
    "o": "attn/o",
    "gate": "mlp/gate",
    "up": "mlp/up",
    "down": "mlp/down",
}
_SUFFIXES = ("_lora_a", "_lora_b")


STAGES = ("sft", "train")
QTYPES = ("", "int8", "int4", "nf4")  # "": the base stays in its stored dtype


def defaults() -> dict:
  """`config.model.lora`: rank 0 trains every weight (no adapters)."""
  # stages: those of the training stages that train adapters; the others train every weight
  # (e.g. "train" after an SFT from scratch, which has no pretrained base to adapt).
  return dict(
      rank=0,
      alpha=16.0,
      dropout=0.0,
      targets="q,k,v,o,gate,up,down",
      stages="sft,train",
      base_qtype="",
      base_tile_size=0,
      init_from="",
  )


def enabled(config, stage: str = "train") -> bool:
  """Whether the `stage` stage ("sft" or "train") trains adapters."""
  # Like the other run keys of `config.model`, `lora` may be left out of a model section: off.
  lora = config.model.get("lora")
  return lora is not None and int(lora.rank) > 0 and stage in _stages(lora)


def _stages(lora_cfg) -> list[str]:
  return [s.strip() for s in str(lora_cfg.stages).split(",") if s.strip()]


def targets(lora_cfg) -> list[str]:
  names = [t.strip() for t in str(lora_cfg.targets).split(",") if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    raise UserError(
        f"config.model.lora.targets={lora_cfg.targets!r}; name some of {', '.join(TARGETS)}"
    )
  return names


def check(config) -> None:
  lora = config.model.get("lora")
  if lora is None:
    return
  for key in lora:
    if key not in defaults():
      near = difflib.get_close_matches(key, list(defaults()), n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise UserError(f"config.model.lora has no setting {key}{hint}")
  if not isinstance(lora.rank, int) or lora.rank < 0:
    raise UserError(f"config.model.lora.rank={lora.rank!r} must be 0 (off) or a positive rank")
  targets(lora)
  if not lora.alpha > 0:
    raise UserError(f"config.model.lora.alpha={lora.alpha!r} must be positive")
  if not 0.0 <= float(lora.dropout) < 1.0:
    raise UserError(f"config.model.lora.dropout={lora.dropout!r} must be in [0, 1)")
  if lora.base_qtype not in QTYPES:
    raise UserError(
        f"config.model.lora.base_qtype={lora.base_qtype!r}; use one of "
        f"{', '.join(repr(q) for q in QTYPES)} ('' keeps the base unquantized)"
    )
  if not isinstance(lora.base_tile_size, int) or lora.base_tile_size < 0:
    raise UserError(
        f"config.model.lora.base_tile_size={lora.base_tile_size!r} must be 0 (one scale per "
        "output channel) or the rows per scale, e.g. 64"
    )
  if lora.init_from and (
      "sft" not in _stages(lora) or not config.model.get("path") or not lora.rank
  ):
    raise UserError(
        "config.model.lora.init_from (a PEFT adapter to go on training) starts the SFT stage's "
        "adapters over the model it was trained on: set config.model.path to that model, "
        "config.model.lora.rank to the adapter's rank, and keep 'sft' in config.model.lora.stages"
    )
  if lora.base_qtype and config.model.get("scan_layers"):
    # qwix quantizes a kernel inside the scanned block, and its scales lose the layer axis.
    raise UserError(
        "config.model.lora.base_qtype (QLoRA) needs the decoder layers per layer: add "
        "--config.model.scan_layers=False"
    )
  if not _stages(lora) or set(_stages(lora)) - set(STAGES):
    raise UserError(
        f"config.model.lora.stages={lora.stages!r}; name one or both of {', '.join(STAGES)}"
    )


def check_imported(lora_cfg, found: dict, directory) -> None:
  """Refuses adapters read from `directory` whose rank, alpha or targets (`found`) are not those
  of `lora_cfg`, naming the settings that take them."""
  want = dict(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), targets=set(targets(lora_cfg)))
  got = dict(found, targets=set(found["targets"].split(",")))
  if want != got:
    raise UserError(
        f"{directory} is a rank-{found['rank']} adapter (alpha {found['alpha']:g}) of "
        f"{found['targets']}; go on training it with --config.model.lora.rank={found['rank']} "
        f"--config.model.lora.alpha={found['alpha']:g} "
        f"--config.model.lora.targets={found['targets']}"
    )


def adapt(model: nn.Module, lora_cfg, quantized: bool = True) -> nn.Module:
  """`model` with adapters of `lora_cfg.rank` on the targeted projections of every layer, over
  a base quantized by `base_qtype` unless `quantized` is False (for initialising the adapters:
  qwix creates no adapters on the attention kernels while it traces a quantized model's init,
  and the adapters do not depend on how the base is stored)."""
  paths = "|".join(TARGETS[t] for t in targets(lora_cfg))
  tile = int(_setting(lora_cfg, "base_tile_size"))
  if tile and quantized and _setting(lora_cfg, "base_qtype"):
    _check_tiles(model.cfg, targets(lora_cfg), tile)
  rule = qwix.LoraRule(
      module_path=rf"(layer_\d+|layers)/({paths})",
      rank=int(lora_cfg.rank),
      alpha=float(lora_cfg.alpha),
      dropout=float(_setting(lora_cfg, "dropout")),
      weight_qtype=(_setting(lora_cfg, "base_qtype") or None) if quantized else None,
      tile_size=tile or None,
  )
  return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))


def _setting(lora_cfg, key: str):
  # Adapters read back (a run's config.json from before a key existed, a PEFT import) may lack
  # the keys that do not change what they compute.
  return lora_cfg.get(key, defaults()[key])


def _check_tiles(model_cfg, names: list[str], tile: int) -> None:
  # qwix tiles each kernel along the input axis it contracts: d_model, or for `o` head_dim and
  # for `down` d_ff.
  sizes = {"o": model_cfg.head_dim, "down": model_cfg.d_ff}
  bad = sorted(
      {
          f"{t} ({sizes.get(t, model_cfg.d_model)})"
          for t in names
          if sizes.get(t, model_cfg.d_model) % tile
      }
  )
  if bad:
    raise UserError(
        f"config.model.lora.base_tile_size={tile} does not divide the input size of "
        f"{', '.join(bad)}; use a divisor of each, or 0 (one scale per output channel)"
    )


def quantize_base(model: nn.Module, params, lora_cfg):
  """The frozen base as the adapted `model` reads it: `params` (unboxed, `model`'s plain
  parameters) with the targeted kernels quantized by `base_qtype`; `params` itself without."""
  if not _setting(lora_cfg, "base_qtype"):
    return params
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda: adapt(model, lora_cfg).init(jax.random.key(0), tokens, jnp.ones_like(tokens))
  # The abstract quantized tree tells qwix how each kernel is quantized (its axes and tiles).
  return qwix.quantize_params(params, jax.eval_shape(init)["params"], allow_extra_params=True)


def dequantize(params):
  """`params` with every quantized kernel (a QLoRA base's) back in float32."""
  return jax.tree.map(
      lambda x: qwix.dequantize(x.array) if _is_quantized(x) else x, params, is_leaf=_is_quantized
  )


def _is_quantized(x) -> bool:
  # qwix's quantized parameter (`WithAux`, not exported) wraps a QArray as `array`.
  return isinstance(getattr(x, "array", None), qwix.QArray)


def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(_SUFFIXES)


def split(params, trained=is_adapter):
  """(frozen, trained): the leaves of a parameter dict for which `trained(path)` is false, and
  those for which it is true, each as a nested dict of the same layout (boxed or not)."""
  flat = flax.traverse_util.flatten_dict(params)
  pick = lambda keep: flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if trained(k) == keep}
  )
  return pick(False), pick(True)


def merge(frozen, trained):
  """The inverse of `split`; `frozen` None (a run without adapters) gives `trained` itself."""
  if frozen is None:
    return trained
  flat = flax.traverse_util.flatten_dict(frozen)
  flat.update(flax.traverse_util.flatten_dict(trained))
  return flax.traverse_util.unflatten_dict(flat)


def fold(params, lora_cfg):
  """The plain model's parameters: each adapted kernel W replaced by W + (alpha / rank) A B (W
  dequantized first where the base is quantized)."""
  scale = float(lora_cfg.alpha) / int(lora_cfg.rank)
  flat = flax.traverse_util.flatten_dict(dequantize(params))
  out = {}
  for path, value in flat.items():
    if is_adapter(path):
      continue
    a = flat.get(path[:-1] + (path[-1] + "_lora_a",))
    if a is not None:
      b = flat[path[:-1] + (path[-1] + "_lora_b",)]
      delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
      value = (value.astype(jnp.float32) + delta.reshape(value.shape)).astype(value.dtype)
    out[path] = value
  return flax.traverse_util.unflatten_dict(out)
