"""LoRA adapters over one frozen base (`config.model.lora`), through Google's qwix.

qwix wraps the Transformer so that each targeted projection computes x W + (alpha / rank) x A B
with two new parameters beside its kernel, `kernel_lora_a` [in, rank] and `kernel_lora_b`
[rank, out] (the kernel's input and output axes flattened), boxed with the kernel's logical axis
names, so they shard by the same rules. B starts at zero: an adapted model starts equal to its
base. A run with adapters trains only them (and a value model's scalar head); the base, the SFT
policy, is held once and shared by the policy and the value model, and it is also the reference
policy. `fold` writes the adapters into the kernels for sampling and export.
"""

from __future__ import annotations

import difflib

import flax.linen as nn
import flax.traverse_util
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


def defaults() -> dict:
  """`config.model.lora`: rank 0 trains every weight (no adapters)."""
  # stages: those of the training stages that train adapters; the others train every weight
  # (e.g. "train" after an SFT from scratch, which has no pretrained base to adapt).
  return dict(rank=0, alpha=16.0, targets="q,k,v,o,gate,up,down", stages="sft,train")


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
  if not _stages(lora) or set(_stages(lora)) - set(STAGES):
    raise UserError(
        f"config.model.lora.stages={lora.stages!r}; name one or both of {', '.join(STAGES)}"
    )


def adapt(model: nn.Module, lora_cfg) -> nn.Module:
  """`model` with adapters of `lora_cfg.rank` on the targeted projections of every layer."""
  paths = "|".join(TARGETS[t] for t in targets(lora_cfg))
  rule = qwix.LoraRule(
      module_path=rf"layer_\d+/({paths})", rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha)
  )
  return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))


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
  """The plain model's parameters: each adapted kernel W replaced by W + (alpha / rank) A B."""
  scale = float(lora_cfg.alpha) / int(lora_cfg.rank)
  flat = flax.traverse_util.flatten_dict(params)
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
