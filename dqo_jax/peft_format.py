"""LoRA adapters in Hugging Face PEFT's layout, out and in: a directory of `adapter_config.json`
and `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads over the base model.

Ours (dqo_jax/lora.py) adds (alpha / r) x A B to a projection, A [in, r] and B [r, out] with the
kernel's input and output axes flattened in the order the family's weight map flattens them;
PEFT adds (lora_alpha / r) x lora_A^T lora_B^T to x W^T, lora_A.weight [r, in] and
lora_B.weight [out, r]. So lora_A = A^T and lora_B = B^T, for every family.

Adapters trained in turn (SFT adapters over a pretrained model, then DQO's over that SFT
policy) sum to one adapter of their summed rank: A' = [A_1 | A_2], B' = [s_1 B_1 ; s_2 B_2],
written with lora_alpha = r' so that PEFT's scale is 1 and the product is exact (a module
adapted in fewer of them is padded with zeros to the one rank PEFT allows).
"""

from __future__ import annotations

import json
import os

import flax.traverse_util
import numpy as np

from dqo_jax import lora, safetensors_io
from dqo_jax.families import weight_map
from dqo_jax.model import ModelConfig, stack_layers

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _modules(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
  """Our adaptable module paths ("layer_0", "attn", "q") -> the Hugging Face module name."""
  out = {}
  for hf, (path, _) in weight_map(cfg).items():
    if path[-1] == "kernel" and path[-2] in lora.TARGETS and hf.endswith(".weight"):
      out[path[:-1]] = hf[: -len(".weight")]
  return out


def stacked(adapter_sets) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
  """{module path: (A [in, R], B [R, out])} with sum_i s_i A_i B_i = A B, from `adapter_sets`,
  a list of (adapter parameters, their `config.model.lora`) in the order they were trained."""
  parts: dict[tuple[str, ...], list] = {}
  for params, lora_cfg in adapter_sets:
    scale = float(lora_cfg.alpha) / int(lora_cfg.rank)
    flat = flax.traverse_util.flatten_dict(params)
    for path, a in flat.items():
      if path[-1].endswith("_lora_a"):
        b = flat[path[:-1] + (path[-1][: -len("_a")] + "_b",)]
        parts.setdefault(path[:-1], []).append((np.asarray(a), scale * np.asarray(b)))
  out = {
      module: (np.concatenate([a for a, _ in ab], 1), np.concatenate([b for _, b in ab], 0))
      for module, ab in parts.items()
  }
  # PEFT has one rank: a module adapted in fewer of the sets gets zero columns of A (and rows
  # of B), which add nothing.
  rank = max((a.shape[1] for a, _ in out.values()), default=0)
  pad = lambda x, axis: np.pad(
      x, [(0, rank - x.shape[axis]) if i == axis else (0, 0) for i in (0, 1)]
  )
  return {module: (pad(a, 1), pad(b, 0)) for module, (a, b) in out.items()}


def export_peft(adapter_sets, cfg: ModelConfig, directory, *, base_model: str = "") -> list[str]:
  """Writes the adapters as a PEFT LoRA adapter of `cfg`'s family (float32); returns the files.
  `base_model` is recorded as `base_model_name_or_path`: the model it loads over."""
  modules, specs, targets = _modules(cfg), [], set()
  for module, (a, b) in sorted(stacked(adapter_sets).items()):
    name = _PREFIX + modules[module]
    targets.add(modules[module].rsplit(".", 1)[-1])
    for suffix, x in (("lora_A", a.T), ("lora_B", b.T)):
      x = np.ascontiguousarray(x, np.float32)
      specs.append((f"{name}.{suffix}.weight", x.shape, x.dtype, lambda x=x: x))
  if not specs:
    raise ValueError("no LoRA adapters to export (the checkpoint holds full weights: --to_hf)")
  rank = specs[0][1][0]
  os.makedirs(directory, exist_ok=True)
  safetensors_io.write_file(os.path.join(directory, ADAPTER_WEIGHTS), specs)
  config = dict(
      peft_type="LORA",
      task_type="CAUSAL_LM",
      base_model_name_or_path=base_model,
      r=int(rank),
      lora_alpha=float(rank),  # scale 1: the scales are in lora_B
      lora_dropout=0.0,
      target_modules=sorted(targets),
      bias="none",
      fan_in_fan_out=False,
      inference_mode=True,
      use_rslora=False,
  )
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


def import_peft(directory, cfg: ModelConfig):
  """(adapter parameters in our layout, their `config.model.lora` as a dict) from a PEFT LoRA
  adapter directory of `cfg`'s family."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
  with open(path) as f:
    config = json.load(f)
  unsupported = [
      k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora") if config.get(k)
  ]
  if config.get("peft_type") != "LORA" or unsupported or config.get("bias", "none") != "none":
    raise ValueError(
        f"{path}: only plain LoRA adapters (one rank, no bias, no {', '.join(unsupported) or 'DoRA'})"
        " can be imported"
    )
  names = {hf: module for module, hf in _modules(cfg).items()}
  weights = safetensors_io.SafetensorsFile(os.path.join(directory, ADAPTER_WEIGHTS))
  flat, targets = {}, set()
  for name in weights.keys():
    # base_model.model.<module>.lora_A.weight (PEFT may leave out ".weight"'s adapter name)
    hf, suffix = name[len(_PREFIX) :].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
    if hf not in names or suffix not in ("lora_A", "lora_B"):
      raise ValueError(f"{directory}: {name} adapts no projection of a {cfg.family} model")
    module = names[hf]
    targets.add(module[-1])
    x = np.asarray(weights.read(name), np.float32).T
    flat[module + ("kernel_lora_a" if suffix == "lora_A" else "kernel_lora_b",)] = x
  lora_cfg = dict(
      rank=int(config["r"]),
      alpha=float(config["lora_alpha"]),
      targets=",".join(t for t in lora.TARGETS if t in targets),
  )
  adapters = flax.traverse_util.unflatten_dict(flat)
  if cfg.scan_layers:
    adapters = stack_layers(adapters, cfg.n_layers)
  return adapters, lora_cfg
