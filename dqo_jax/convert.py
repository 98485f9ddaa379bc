"""Hugging Face checkpoints in and out: declarative weight maps, import, export and the CLI.

    python -m dqo_jax.convert --from_hf HF_DIR --to OUR_DIR      # safetensors -> Orbax
    python -m dqo_jax.convert --from OUR_DIR --to_hf HF_DIR      # Orbax -> safetensors
    python -m dqo_jax.convert --from OUR_DIR --params WORKDIR/dqo/checkpoints --to_hf HF_DIR
    python -m dqo_jax.convert --from OUR_DIR --params WORKDIR/sft/checkpoints,WORKDIR/dqo/checkpoints \
        --to_peft ADAPTER_DIR                                   # LoRA adapters -> PEFT

`--params` lists training checkpoints applied in turn over OUR_DIR's weights: full weights
replace them, LoRA adapters (a run with `config.model.lora`, whose settings are read from the
run's WORKDIR/config.json) are folded in; `--to_peft` writes the adapters as one PEFT adapter
over OUR_DIR's model instead (dqo_jax/peft_format.py). A PEFT adapter trained elsewhere is
folded into OUR_DIR's weights as a new directory, for `config.model.path` (evaluation or
further training):

    python -m dqo_jax.convert --from OUR_DIR --peft ADAPTER_DIR --to NEW_OUR_DIR

Each family has one table of (Hugging Face name, our parameter path, rule); `{i}` stands for
the layer. A rule says how a tensor changes shape between the two layouts (Hugging Face linear
weights are [out, in]; ours are [in, ...out] with the heads split out). Import reads the
checkpoint one tensor at a time and places each straight into its target sharding and dtype,
so host memory holds the placed model plus about one tensor in flight (docs/models.md).

OUR_DIR holds `params/` (an Orbax checkpoint of the parameter tree), `model_config.json`, and
`hf/` (the source `config.json`, generation config and tokenizer files, used by the export).
HF_DIR must be new or empty; `--overwrite` replaces an earlier export there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from dqo_jax import hf_config, lora, safetensors_io, sharding
from dqo_jax.families import weight_map
from dqo_jax.peft_format import export_peft, import_peft
from dqo_jax.model import ModelConfig, Transformer, unstack_layers

# Tensors some checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

# rule: (Hugging Face -> ours given our shape, ours -> Hugging Face)
RULES: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda x, shape: x.reshape(shape), lambda x: x),
    "transpose": (lambda x, shape: x.T.reshape(shape), lambda x: x.T),
    # [heads * head_dim, embed] -> [embed, heads, head_dim]
    "heads_out": (lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T),
    # [heads * head_dim] -> [heads, head_dim]
    "heads_bias": (lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1)),
    # [embed, heads * head_dim] -> [heads, head_dim, embed]
    "heads_in": (lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T),
}

HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def abstract_params(cfg: ModelConfig, head: str = "lm"):
  """Boxed (logically partitioned) shapes of the parameters, without allocating them."""
  model = Transformer(cfg, head=head)
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, jnp.ones_like(tokens)))[
      "params"
  ]


def param_shardings(boxed, mesh: Mesh | None, rules):
  """NamedShardings from the logical axis names (one device when there is no mesh)."""
  if mesh is None:
    one = SingleDeviceSharding(jax.devices()[0])
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda _: one, boxed, is_leaf=is_box)
  return sharding.state_shardings(boxed, mesh, rules)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _place(host: np.ndarray, sharding) -> jax.Array:
  # Each device (each process's devices, on a multi-host TPU) takes its slice of the host array.
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def import_hf(
    directory: str | os.PathLike,
    mesh: Mesh | None = None,
    rules=(),
    *,
    dtype="float32",
    compute_dtype: str = "float32",
) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face checkpoint directory into (config, parameters boxed with their
  logical axis names), each tensor converted to `dtype` and placed by `rules` on `mesh`."""
  directory = os.fspath(directory)
  _check_dir(directory)
  cfg = hf_config.model_config_from_hf(directory, compute_dtype)
  files = safetensors_io.checkpoint_files(directory)
  boxed = abstract_params(cfg)
  shapes = nn.meta.unbox(boxed)
  shardings = param_shardings(boxed, mesh, rules)
  wmap = weight_map(cfg)
  params: dict = {}
  unexpected = []
  for name, f in safetensors_io.iter_tensors(files):
    if name not in wmap:
      tied_head = name == "lm_head.weight" and cfg.tie_embeddings
      if not (tied_head or _IGNORED.match(name)):
        unexpected.append(name)
      continue
    path, rule = wmap[name]
    try:
      target = _get(shapes, path)
    except KeyError:
      unexpected.append(name)  # e.g. a bias the config does not declare
      continue
    back = RULES[rule][1]
    expected = jax.eval_shape(back, jax.ShapeDtypeStruct(target.shape, jnp.float32)).shape
    if f.shape(name) != expected:
      raise ValueError(f"{f.path}: {name} has shape {f.shape(name)}, expected {expected}")
    host = RULES[rule][0](f.read(name), target.shape).astype(dtype, copy=False)
    _set(params, path, _place(host, _get(shardings, path)))
    del host
  if unexpected:
    raise ValueError(
        f"{directory}: {len(unexpected)} tensors with no place in a {cfg.family} model: "
        + ", ".join(unexpected[:4])
        + (" ..." if len(unexpected) > 4 else "")
    )
  by_path = {p: n for n, (p, _) in wmap.items()}
  missing = [by_path.get(p, "/".join(p)) for p, _ in _flatten(shapes) if not _has(params, p)]
  if missing:
    raise ValueError(
        f"{directory}: checkpoint lacks {len(missing)} tensors: "
        + ", ".join(missing[:4])
        + (" ..." if len(missing) > 4 else "")
    )
  return cfg, sharding.rebox(boxed, params)


def _has(tree, path) -> bool:
  try:
    _get(tree, path)
    return True
  except KeyError:
    return False


def _check_dir(directory: str) -> None:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory")
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")


def _check_export_dir(directory: str, overwrite: bool) -> list[str]:
  """The files already in `directory`; ValueError if there are any and not `overwrite`."""
  present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  if present and not overwrite:
    raise ValueError(
        f"{directory} is not empty ({', '.join(present[:3])}{', ...' if len(present) > 3 else ''})"
        "; choose a new directory, or pass --overwrite to replace the export there"
    )
  return present


def _prepare_export_dir(directory: str, overwrite: bool) -> None:
  present = _check_export_dir(directory, overwrite)
  os.makedirs(directory, exist_ok=True)
  for name in present:
    if name == safetensors_io.INDEX or (name.startswith("model") and name.endswith(".safetensors")):
      os.remove(os.path.join(directory, name))


def export_hf(
    params,
    cfg: ModelConfig,
    directory: str | os.PathLike,
    *,
    dtype="bfloat16",
    base_config: dict | None = None,
    files_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
) -> list[str]:
  """Writes `params` (our LM parameter tree, unboxed or boxed) as a Hugging Face checkpoint:
  safetensors (sharded above `max_shard_bytes`, with an index), `config.json` and the
  tokenizer and generation files found in `files_from`. Returns the files written.

  A non-empty `directory` is refused unless `overwrite`, which first removes the weight files
  of the export there: a stale `model.safetensors` beside a new index (or the reverse) would be
  what `transformers` loads."""
  directory = os.fspath(directory)
  _prepare_export_dir(directory, overwrite)
  params = nn.meta.unbox(params)
  dtype = np.dtype(jnp.dtype(dtype))
  wmap = weight_map(cfg)
  specs, used = [], set()
  for name, (path, rule) in wmap.items():
    if not _has(params, path):
      continue
    used.add(path)
    value = _get(params, path)
    back = RULES[rule][1]
    # Shapes of the Hugging Face layout, without touching the data.
    shape = jax.eval_shape(back, jax.ShapeDtypeStruct(value.shape, value.dtype)).shape
    produce = lambda value=value, back=back: back(np.asarray(jax.device_get(value))).astype(dtype)
    specs.append((name, shape, dtype, produce))
  extra = [p for p, _ in _flatten(params) if p not in used]
  if extra:
    raise ValueError(
        f"parameters with no Hugging Face name: {', '.join('/'.join(p) for p in extra[:4])}"
        + (" (export the policy, not the value model)" if ("value_head",) in extra else "")
    )
  written = safetensors_io.write_checkpoint(directory, specs, max_shard_bytes)
  if files_from is not None:
    for name in HF_FILES:
      src = os.path.join(files_from, name)
      if name != "config.json" and os.path.isfile(src):
        shutil.copyfile(src, os.path.join(directory, name))
        written.append(name)
    if base_config is None and os.path.isfile(os.path.join(files_from, "config.json")):
      base_config = hf_config.read_hf_config(files_from)
  config = hf_config.hf_config_from_model_config(cfg, base_config)
  config["torch_dtype"] = str(dtype)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return written + ["config.json"]


# Our directory layout: params/ (Orbax), model_config.json, hf/ (config and tokenizer files).
OUR_CONFIG, OUR_PARAMS, OUR_HF = "model_config.json", "params", "hf"


def save_ours(params, cfg: ModelConfig, directory: str | os.PathLike, hf_files_from=None) -> None:
  """Writes parameters (Orbax), the model config and the Hugging Face side files."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, OUR_PARAMS), nn.meta.unbox(params), force=True)
  with open(os.path.join(directory, OUR_CONFIG), "w") as f:
    json.dump(cfg.to_json(), f, indent=2)
  if hf_files_from is not None:
    os.makedirs(os.path.join(directory, OUR_HF), exist_ok=True)
    for name in HF_FILES:
      src = os.path.join(hf_files_from, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(directory, OUR_HF, name))


def load_ours(
    directory: str | os.PathLike, mesh: Mesh | None = None, rules=(), *, dtype=None
) -> tuple[ModelConfig, dict]:
  """Reads what `save_ours` wrote into (config, boxed parameters) placed by `rules`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(os.fspath(directory))
  for need in (OUR_CONFIG, OUR_PARAMS):
    if not os.path.exists(os.path.join(directory, need)):
      raise FileNotFoundError(f"{directory}: no {need} (write it with python -m dqo_jax.convert)")
  with open(os.path.join(directory, OUR_CONFIG)) as f:
    cfg = ModelConfig.from_json(json.load(f))
  boxed = abstract_params(cfg)
  shardings = param_shardings(boxed, mesh, rules)
  target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh),
      nn.meta.unbox(boxed),
      shardings,
  )
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(os.path.join(directory, OUR_PARAMS), target)
  return cfg, sharding.rebox(boxed, params)


def load_pretrained_params(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules=(),
    *,
    dtype="float32",
    compute_dtype: str = "float32",
    scan_layers: bool = False,
) -> tuple[ModelConfig, dict]:
  """(ModelConfig, boxed parameters placed by `rules` on `mesh`) from a Hugging Face directory
  or one written by `python -m dqo_jax.convert --from_hf`; what `config.model.path` names.
  With `scan_layers`, in the scanned layout (`dqo_jax.model.stack_layers`)."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, OUR_CONFIG)):
    cfg, params = load_ours(path, mesh, rules, dtype=dtype)
    cfg = ModelConfig.from_json(cfg.to_json() | {"dtype": compute_dtype})
  else:
    cfg, params = import_hf(path, mesh, rules, dtype=dtype, compute_dtype=compute_dtype)
  if scan_layers and not cfg.scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = _stacked(params, cfg, mesh, rules)
  return cfg, params


def _stacked(params, cfg: ModelConfig, mesh: Mesh | None, rules):
  """Boxed per-layer parameters -> the scanned layout of `cfg`, placed by `rules`. One
  parameter is stacked at a time and its per-layer arrays freed, so the device holds one extra
  layer-stack at most."""
  boxed = abstract_params(cfg)
  shardings = param_shardings(boxed, mesh, rules)["layers"]
  params = nn.meta.unbox(params)
  names = [f"layer_{i}" for i in range(cfg.n_layers)]
  stacked = {}
  for path, sharding_ in _flatten(shardings):
    parts = [_get(params[n], path) for n in names]
    _set(stacked, path, jax.jit(lambda *a: jnp.stack(a), out_shardings=sharding_)(*parts))
    for a in parts:
      a.delete()
  rest = {k: v for k, v in params.items() if k not in names}
  return sharding.rebox(boxed, rest | {"layers": stacked})


def load_pretrained(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules=(),
    *,
    dtype="float32",
    compute_dtype: str = "float32",
):
  """(ModelConfig, boxed parameters, tokenizer) of a pretrained model directory."""
  from dqo_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(path)  # first: a missing tokenizer fails before the weights load
  cfg, params = load_pretrained_params(path, mesh, rules, dtype=dtype, compute_dtype=compute_dtype)
  return cfg, params, tokenizer


def check_pretrained(path: str | os.PathLike) -> None:
  """Raises a one-line FileNotFoundError/ValueError naming what a model directory lacks (config,
  tokenizer, weight files or shards), reading no weights."""
  from dqo_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  pretrained_config(path)
  load_tokenizer(path)
  if not os.path.isfile(os.path.join(path, OUR_CONFIG)):
    safetensors_io.checkpoint_files(path)
  elif not os.path.isdir(os.path.join(path, OUR_PARAMS)):
    raise FileNotFoundError(f"{path}: no {OUR_PARAMS}/ (write it with python -m dqo_jax.convert)")


def pretrained_config(path: str | os.PathLike, compute_dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a pretrained directory (either layout), reading no weights."""
  path = os.fspath(path)
  ours = os.path.join(path, OUR_CONFIG)
  if os.path.isfile(ours):
    with open(ours) as f:
      return ModelConfig.from_json(json.load(f) | {"dtype": compute_dtype})
  _check_dir(path)
  return hf_config.model_config_from_hf(path, compute_dtype)


def _restore_trained_params(checkpoints: str, cfg: ModelConfig):
  """The policy's `params` in the newest training checkpoint (a stage's `checkpoints/`
  directory, local or in a gs:// workdir), and the run's `config.model.lora` when they are LoRA
  adapters (else None)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from dqo_jax.checkpoint import as_path  # pylint: disable=g-import-not-at-top

  mgr = ocp.CheckpointManager(as_path(checkpoints))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{checkpoints}: no checkpoint")
  state = mgr.restore(step, args=ocp.args.StandardRestore())
  mgr.close()
  params = state["policy"]["params"] if "policy" in state else state["params"]
  params = unstack_layers(params)  # a run with model.scan_layers: exported per layer
  got = {p for p, _ in _flatten(params)}
  if all(lora.is_adapter(p) for p in got):
    return params, _run_lora(checkpoints)
  if {p for p, _ in _flatten(nn.meta.unbox(abstract_params(cfg)))} != got:
    raise ValueError(f"{checkpoints}: parameters do not match the model config")
  return params, None


def _run_lora(checkpoints: str):
  """`config.model.lora` of the run whose checkpoints these are (WORKDIR/<run>/checkpoints)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(checkpoints).parent.parent / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{checkpoints} holds LoRA adapters and {path} (their run's config) is missing"
    )
  return ml_collections.ConfigDict(json.loads(path.read_text())["model"]["lora"])


def _applied(params, checkpoints: list[str], cfg: ModelConfig):
  """`params` with each checkpoint's weights applied in turn: full ones replace them, LoRA
  adapters are folded in."""
  for path in checkpoints:
    trained, lora_cfg = _restore_trained_params(path, cfg)
    if lora_cfg is None:
      params = trained
    else:  # over the base as the run read it (quantized: QLoRA)
      base = lora.quantize_base(Transformer(cfg), params, lora_cfg)
      params = lora.fold(lora.merge(base, trained), lora_cfg)
  return params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dqo_jax.convert", description=__doc__)
  parser.add_argument("--from_hf", help="Hugging Face model directory to import")
  parser.add_argument("--to", help="our directory to write (with --from_hf, or --from --peft)")
  parser.add_argument("--from", dest="src", help="our directory (config, params, tokenizer)")
  parser.add_argument(
      "--params",
      default="",
      help="training checkpoints/ directories (comma-separated) applied in turn over --from",
  )
  parser.add_argument("--to_hf", help="Hugging Face directory to write (with --from)")
  parser.add_argument(
      "--to_peft", help="PEFT adapter directory to write: --params' LoRA adapters over --from"
  )
  parser.add_argument("--peft", help="a PEFT LoRA adapter directory to fold into --from (--to)")
  parser.add_argument(
      "--dtype", default=None, help="stored dtype (import: float32; export: bfloat16)"
  )
  parser.add_argument("--max_shard_gb", type=float, default=2.0)
  parser.add_argument(
      "--overwrite",
      action="store_true",
      help="export into a non-empty --to_hf directory, removing its weight files first",
  )
  args = parser.parse_args(argv)
  try:
    if args.from_hf and args.to:
      cfg, params = import_hf(args.from_hf, dtype=args.dtype or "float32")
      save_ours(params, cfg, args.to, hf_files_from=args.from_hf)
      print(f"wrote {args.to}: {cfg.family}, {_count(params) / 1e6:.1f}M parameters")
    elif args.src and args.peft and args.to:
      cfg, params = load_ours(args.src)
      adapters, lora_cfg = import_peft(args.peft, cfg)
      params = lora.fold(
          lora.merge(nn.meta.unbox(params), adapters), ml_collections.ConfigDict(lora_cfg)
      )
      save_ours(params, cfg, args.to, hf_files_from=os.path.join(args.src, OUR_HF))
      print(f"wrote {args.to}: {args.src} with the adapter {args.peft} folded in")
    elif args.src and args.to_hf:
      _check_export_dir(args.to_hf, args.overwrite)  # before minutes of loading
      cfg, params = load_ours(args.src)
      params = _applied(nn.meta.unbox(params), _listed(args.params), cfg)
      files = os.path.join(args.src, OUR_HF)
      export_hf(
          params,
          cfg,
          args.to_hf,
          dtype=args.dtype or "bfloat16",
          files_from=files if os.path.isdir(files) else None,
          max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
          overwrite=args.overwrite,
      )
      print(f"wrote {args.to_hf}: {cfg.family}, {_count(params) / 1e6:.1f}M parameters")
    elif args.src and args.to_peft:
      _check_export_dir(args.to_peft, args.overwrite)
      cfg = pretrained_config(args.src)
      adapter_sets = [_restore_trained_params(p, cfg) for p in _listed(args.params)]
      if not adapter_sets or any(c is None for _, c in adapter_sets):
        raise ValueError("--to_peft needs --params naming checkpoints of LoRA runs only")
      export_peft(adapter_sets, cfg, args.to_peft, base_model=os.path.abspath(args.src))
      print(f"wrote {args.to_peft}: a PEFT LoRA adapter over {args.src}")
    else:
      parser.error("use --from_hf DIR --to DIR, or --from DIR --to_hf DIR / --to_peft DIR")
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _listed(paths: str) -> list[str]:
  return [p for p in paths.split(",") if p]


def _count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))


if __name__ == "__main__":
  sys.exit(main())
