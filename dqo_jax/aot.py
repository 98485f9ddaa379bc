"""Ahead-of-time compilation of a run's jitted programs for a TPU slice, on any machine.

`python -m dqo_jax.main --config=configs/gsm8k.py:qwen2_7b --compile_only --topology=v5p-16`

libtpu describes the chips of a named slice without any being attached. A train step is the one
`dqo_jax.train.loop.jit_step` jits for a real run (same shardings, same donation), the sampler,
reference log-prob pass and evaluation the ones their stages call; each is lowered from
abstract shapes (no weights are read or allocated) and compiled by the TPU compiler, whose
memory and cost analyses give per-chip memory and FLOPs. Needs libtpu: the one jax finds itself
(`TPU_LIBRARY_PATH`, or an importable `libtpu` as `jax[tpu]` installs on a TPU VM), else the one
in `LIBTPU_DIR`, where the README's test command installs it (`requirements-aot.txt`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

import jax

from dqo_jax import convert, hf_config, sharding
from dqo_jax.errors import UserError
from dqo_jax.model import ModelConfig, with_overrides


@dataclasses.dataclass(frozen=True)
class Chip:
  cloud_name: str  # Cloud TPU's accelerator type is "<cloud_name>-<size>"
  libtpu_name: str  # the prefix libtpu's topology names use
  hbm_gib: float  # per chip
  peak_tflops: float  # dense bf16, per chip
  cores_per_chip: int  # v4 and v5p slice names count TensorCores: v5p-16 is 8 chips
  torus: bool  # 3-D chip grid (v4, v5p) or 2-D (v5e, v6e)


# Cloud TPU's published per-chip HBM and peak bf16 rates.
CHIPS = {
    "v4": Chip("v4", "v4", 32, 275, 2, True),
    "v5p": Chip("v5p", "v5p", 95, 459, 2, True),
    "v5e": Chip("v5litepod", "v5e", 16, 197, 1, False),
    "v6e": Chip("v6e", "v6e", 32, 918, 1, False),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
EXAMPLES = "v4-8, v4-32, v5p-16, v5p-128, v5e-16 (or v5litepod-16), v6e-8"

# libtpu installed here, outside site-packages, is loaded by the compile alone: importable, jax
# would try to start a TPU with it in every process, and print its start-up errors where none is.
LIBTPU_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dqo_jax", "libtpu")
LIBTPU_INSTALL = f"pip install -U --target {LIBTPU_DIR} -r requirements-aot.txt"


def slice_grid(chips: int, torus: bool) -> tuple[int, ...]:
  """The chip grid of a slice as Cloud TPU lays it out: 4 chips are 2x2(x1), and each doubling
  doubles the last of the shortest sides (v4-16 is 2x2x2, v4-64 2x4x4; v5e-32 is 4x8)."""
  grid = [2, 2, 1] if torus else [2, 2]
  if chips == 1 and not torus:
    return (1, 1)
  while math.prod(grid) < chips:
    i = max(j for j, g in enumerate(grid) if g == min(grid))
    grid[i] *= 2
  if math.prod(grid) != chips:
    raise ValueError(chips)
  return tuple(grid)


def parse_topology(name: str) -> tuple[str, Chip, tuple[int, ...]]:
  """'v5p-16' -> ("v5p", its Chip, chip grid (2, 2, 2)); a UserError for anything else."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod|v6litepod)-(\d+)", name.strip().lower())
  if m:
    kind = _ALIASES.get(m.group(1), m.group(1))
    chip = CHIPS[kind]
    count = int(m.group(2))
    if count % chip.cores_per_chip == 0 and count // chip.cores_per_chip > 0:
      try:
        return kind, chip, slice_grid(count // chip.cores_per_chip, chip.torus)
      except ValueError:
        pass
  raise UserError(
      f"--topology={name!r} is not a TPU slice this knows; use a name like {EXAMPLES} "
      "(power-of-two sizes; v4 and v5p count TensorCores, 2 per chip)"
  )


def topology_devices(name: str):
  """(kind, Chip, compile-only devices) of a named slice."""
  kind, chip, grid = parse_topology(name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # Nothing runs on a TPU here, so concurrent compiles need not lock the (absent) chips; and
  # libtpu, which otherwise looks for the TPU VM it runs on, warns less when told the slice.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chips = math.prod(grid)
  # These TPU_* values (and what libtpu's start-up writes beside them) hold only for the compile:
  # a child of this process must not inherit them and take itself for a host of a pod.
  env = dict(os.environ)
  _point_jax_at_libtpu()
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.cloud_name}-{chips * chip.cores_per_chip}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  options = dict(chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1))
  if chip.cores_per_chip == 2:
    options["chip_config_name"] = "megacore"  # one device per chip, both cores working on it
  try:
    topo = topologies.get_topology_desc(
        f"{chip.libtpu_name}:{'x'.join(map(str, grid))}", "tpu", **options
    )
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise UserError(
          f"--compile_only needs libtpu: {LIBTPU_INSTALL} (from the repository root), or "
          f"pip install 'jax[tpu]=={jax.__version__}' on a TPU VM"
      ) from None
    raise
  finally:
    os.environ.clear()
    os.environ.update(env)
  return kind, chip, topo.devices


def _point_jax_at_libtpu() -> None:
  """Names LIBTPU_DIR's libtpu in TPU_LIBRARY_PATH, unless jax finds a libtpu by itself."""
  if "TPU_LIBRARY_PATH" in os.environ or importlib.util.find_spec("libtpu") is not None:
    return
  path = os.path.join(LIBTPU_DIR, "libtpu", "libtpu.so")
  if os.path.isfile(path):
    os.environ["TPU_LIBRARY_PATH"] = path


def model_config(config) -> ModelConfig:
  """The architecture alone: from `model.path`'s config.json, else the public config of the
  preset's `model.hf_repo`, else the fields of a model trained from scratch."""
  m = config.model
  if m.get("path"):
    return with_overrides(convert.pretrained_config(m.path), m)
  if m.get("hf_repo"):
    if m.hf_repo not in hf_config.KNOWN_CONFIGS:
      raise UserError(
          f"config.model.hf_repo={m.hf_repo}: no built-in architecture; pass "
          f"--config.model.path=DIR (only its config.json is read) or one of "
          f"{', '.join(hf_config.KNOWN_CONFIGS)}"
      )
    return with_overrides(hf_config.model_config_from_hf(hf_config.KNOWN_CONFIGS[m.hf_repo]), m)
  return ModelConfig.from_config(m, config.tokenizer.vocab_size)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _shard_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (4-bit types packed two to a
  byte, as TPUs store them)."""
  return sum(
      math.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8
      for x in jax.tree.leaves(tree)
  )


def _slice_mesh(config, topology: str, batch_key: str):
  """(kind, Chip, devices, mesh) of `config.mesh` on a named slice, refusing a batch
  (`config.<batch_key>`) that does not split over the data axes."""
  kind, chip, devices = topology_devices(topology)
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise UserError(f"{e} (--topology={topology} has {len(devices)} chips)") from None
  data_ways = sharding.batch_rows(mesh)
  section, name = batch_key.split(".")
  batch_size = int(config[section][name])
  if batch_size % data_ways:
    raise UserError(
        f"config.{batch_key}={batch_size} does not split over "
        f"data x fsdp = {data_ways} chips; change the batch size or config.mesh"
    )
  return kind, chip, devices, mesh


def _slice_fields(topology: str, kind: str, devices, mesh) -> dict:
  """What every report says of the slice and the mesh."""
  return dict(
      topology=topology,
      kind=kind,
      chips=len(devices),
      device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape),
  )


def _compile(lowered, what: str, topology: str, mesh, remedies: str):
  """`lowered.compile()`; a UserError saying by how much `what` does not fit, if it does not."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = next(l for l in str(e).splitlines() if l.strip())
    raise UserError(
        f"{what} does not fit on {topology} (mesh {dict(mesh.shape)}): {first.strip()}; try "
        f"{remedies}more fsdp/tensor ways, a smaller batch or a larger slice"
    ) from None


def _unrolled_flops(lower, model_cfg: ModelConfig, chips: int) -> float:
  """FLOPs per chip of a program with scanned layers (or micro-batches). XLA counts a loop's
  body once, so they are read from the same program with the layers unrolled, `lower(cfg)`
  (the step in one batch), lowered but not compiled (the whole slice's arithmetic before
  partitioning), split evenly over the chips."""
  unrolled = lower(dataclasses.replace(model_cfg, scan_layers=False))
  # Lowered.cost_analysis() needs a backend that is not a PJRT plugin, as the TPU's is; the
  # unpartitioned HLO is the same program for any backend, so the CPU's analyses it.
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

  hlo = unrolled._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
  cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo)
  return float(cost["flops"]) / chips


def compile_step(config, topology: str, stage: str = "train") -> dict:
  """Compiles the step of `stage` ("sft", or "train": the step of `config.method`) for a TPU
  slice; the report."""
  from dqo_jax.train import build  # pylint: disable=g-import-not-at-top
  from dqo_jax.train.loop import jit_step  # pylint: disable=g-import-not-at-top

  kind, chip, devices, mesh = _slice_mesh(config, topology, f"{stage}.batch_size")
  model_cfg = model_config(config)
  builder = build.build_sft_step if stage == "sft" else build.build_train_step
  rules = sharding.logical_rules(config.mesh)

  def lowered(cfg, step_config=config):
    built = builder(step_config, cfg, mesh)
    args = (built.abstract_state, built.abstract_batch)
    args += (built.abstract_base,) if built.adapters else ()  # LoRA's frozen base
    step = jit_step(built.step_fn, built.state_shardings, mesh, rules, built.base_shardings)
    return built, step.lower(*args)

  t0 = time.time()
  built, step = lowered(model_cfg)
  state, batch = built.abstract_state, built.abstract_batch
  compiled = _compile(
      step,
      f"the {stage} step",
      topology,
      mesh,
      f"--config.model.remat=full, micro-batches (--config.{stage}.grad_accum_steps), LoRA "
      "adapters (--config.model.lora.rank=16), Adafactor (--config."
      + ("sft.optimizer" if stage == "sft" else "train.policy_optimizer and value_optimizer")
      + ".name=adafactor), ",
  )
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  # Every buffer counted as if all were live at once; the compiler's peak counts those live at
  # the same time (temporaries come and go within the step).
  resident = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
      + mem.generated_code_size_in_bytes
  )
  seq_len = config.data.max_prompt_len + config.data.max_response_len
  rows = jax.tree.leaves(batch)[0].shape[0]  # pairwise methods put two rows per example
  tokens = rows * seq_len
  # The policy's state, and the value model's where the method trains one.
  states = [state.policy, state.value] if hasattr(state, "value") else [state]
  flops = float(cost["flops"])
  section = "sft" if stage == "sft" else "train"
  if model_cfg.scan_layers or config[section].grad_accum_steps > 1:
    # Micro-batches are a loop too: the same arithmetic is read from the step in one batch.
    whole = config.copy_and_resolve_references()
    whole[section].grad_accum_steps = 1
    flops = _unrolled_flops(lambda cfg: lowered(cfg, whole)[1], model_cfg, len(devices))
  step_s = flops / (chip.peak_tflops * 1e12)
  return dict(
      **_slice_fields(topology, kind, devices, mesh),
      model=config.model.get("name") or f"{model_cfg.n_layers}-layer d{model_cfg.d_model}",
      params=_count(
          jax.eval_shape(lambda: build.boxed_init(built.policy_model, jax.random.key(0)))
      ),
      trained_params=_count([s.params for s in states]),
      lora_rank=int(config.model.lora.rank) if built.adapters else 0,
      base_qtype=config.model.lora.base_qtype if built.adapters else "",
      base_params=_shard_bytes(built.abstract_base),
      method="sft" if stage == "sft" else config.method,
      stage=stage,
      remat=config.model.get("remat", "none"),
      scan_layers=model_cfg.scan_layers,
      attention=model_cfg.attention,
      # Pallas kernels compile to TPU custom calls: their count shows the kernel was used.
      pallas_kernels=compiled.as_text().count("tpu_custom_call"),
      dtype=model_cfg.dtype,
      state_dtypes=sorted(
          {
              str(x.dtype)
              for x in jax.tree.leaves(state)
              if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
          }
      ),
      batch=rows,
      seq_len=seq_len,
      compile_s=seconds,
      policy_params=_shard_bytes(states[0].params),
      value_params=_shard_bytes([s.params for s in states[1:]]),
      optimizer_state=_shard_bytes([s.opt_state for s in states]),
      optimizers=_optimizers(config, stage, len(states)),
      batch_bytes=_shard_bytes(batch),
      arguments=mem.argument_size_in_bytes,
      outputs=mem.output_size_in_bytes,
      aliased=mem.alias_size_in_bytes,
      temporaries=mem.temp_size_in_bytes,
      code=mem.generated_code_size_in_bytes,
      resident=resident,
      peak=mem.peak_memory_in_bytes,
      hbm=chip.hbm_gib * 2**30,
      flops_per_chip=flops,
      peak_tflops=chip.peak_tflops,
      step_s=step_s,
      tokens_per_s=tokens / step_s,
  )


# The programs of the stages that generate or score (beside the train steps): the stage whose
# run compiles them, the batch they run at, what they are.
PROGRAMS = {
    "sample": ("sample", "sample.batch_size", "sampling: prefill, KV cache and decode loop"),
    "reference": ("sample", "sample.batch_size", "the reference log-probs of the samples"),
    "eval": ("eval", "eval.batch_size", "greedy decoding of the evaluation"),
}


def compile_program(config, topology: str, program: str) -> dict:
  """Compiles one of `PROGRAMS` for a TPU slice, as its stage calls it (the policy's float
  parameters laid out by their logical axes, the batch split over the data axes); its report."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dqo_jax import generation, sampler  # pylint: disable=g-import-not-at-top
  from dqo_jax.train import build  # pylint: disable=g-import-not-at-top
  from dqo_jax.train.loop import abstract_state  # pylint: disable=g-import-not-at-top

  _, batch_key, what = PROGRAMS[program]
  kind, chip, devices, mesh = _slice_mesh(config, topology, batch_key)
  model_cfg = model_config(config)
  policy, _ = build.models(config, model_cfg)
  rules = sharding.logical_rules(config.mesh)
  abstract_params = lambda model: abstract_state(
      lambda rng: build.boxed_init(model, rng), mesh, rules
  )[0]
  params = abstract_params(policy)
  d = config.data
  rows = int(config[batch_key.split(".")[0]].batch_size)
  ints = lambda *shape: jax.ShapeDtypeStruct(
      shape, jnp.int32, sharding=sharding.batch_sharding(mesh)
  )
  k = int(config.sample.samples_per_prompt) if program == "sample" else 1
  prompt = ints(generation.prompts_per_call(rows, k, mesh), d.max_prompt_len)
  if program == "reference":
    new_tokens = d.max_response_len
    batch = dict(
        prompt=prompt, prompt_mask=prompt, response=ints(rows, new_tokens), response_len=ints(rows)
    )

    def lower(cfg):
      model = build.models(config, cfg)[0]
      return generation.logprobs_program(model).lower(abstract_params(model), batch)

    lowered = lower(model_cfg)
  else:
    new_tokens = d.max_response_len if program == "sample" else int(config.eval.max_new_tokens)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    refill = int(config[batch_key.split(".")[0]].refill_rows)
    # The token ids are static arguments; any give the same program's size.
    ids = dict(eos_id=1, pad_id=0, temperature=float(config.sample.temperature))
    if refill > 0:
      # Refilled decode slots: the decode loop over `rows` slots holds the cache; each refill
      # prefills refill_rows / K prompts, a smaller program not compiled here.
      what = f"{what}, refilled decode slots"
      rows, _ = generation.slot_shape(rows, refill, k, mesh)
      slots = jax.eval_shape(
          lambda: sampler.empty_slots(
              policy, rows, d.max_prompt_len, new_tokens, jax.random.key(0), width=1
          )
      )
      placed = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
      by_row = sharding.batch_sharding(mesh)
      slots = jax.tree.map(lambda x: placed(x, by_row), slots._replace(rng=None))._replace(rng=key)
      lowered = sampler.decode_slots.lower(
          policy, params, slots, jnp.int32(rows), greedy=program == "eval", **ids
      )
    else:
      lowered = sampler.generate.lower(
          policy,
          params,
          prompt,
          prompt,
          key,
          max_new_tokens=new_tokens,
          greedy=program == "eval",
          samples_per_prompt=k,
          **ids,
      )
  t0 = time.time()
  remedies = f"a smaller --config.{batch_key}, "
  compiled = _compile(lowered, f"the {program} program ({what})", topology, mesh, remedies)
  mem = compiled.memory_analysis()
  return dict(
      **_slice_fields(topology, kind, devices, mesh),
      program=program,
      what=what,
      batch=rows,
      prompt_len=d.max_prompt_len,
      new_tokens=new_tokens,
      compile_s=time.time() - t0,
      params_bytes=_shard_bytes(params),
      arguments=mem.argument_size_in_bytes,
      temporaries=mem.temp_size_in_bytes,
      peak=mem.peak_memory_in_bytes,
      hbm=chip.hbm_gib * 2**30,
      flops_per_chip=(
          _unrolled_flops(lower, model_cfg, len(devices))
          if program == "reference" and model_cfg.scan_layers
          else float(compiled.cost_analysis()["flops"])
      ),
  )


def format_program_report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  return (
      f"{r['program']} ({r['what']}) on {r['topology']}, mesh {mesh}: {r['batch']} rows x "
      f"({r['prompt_len']} prompt + {r['new_tokens']} new tokens); per chip: policy parameters "
      f"{gib(r['params_bytes'])}, arguments {gib(r['arguments'])}, temporaries "
      f"{gib(r['temporaries'])}, peak {gib(r['peak'])} of {r['hbm'] / 2**30:.0f} GiB HBM "
      f"({100 * r['peak'] / r['hbm']:.0f}%); "
      # XLA's cost analysis does not multiply a while loop's body by its trips: no FLOPs for
      # the decode loops.
      + (f"{r['flops_per_chip']:.3e} FLOPs per chip; " if r["program"] == "reference" else "")
      + f"compiled in {r['compile_s']:.0f}s"
  )


def _optimizers(config, stage: str, num_models: int) -> str:
  """What the optimizer state holds, e.g. "AdamW moments" or "Adafactor factored moments"."""
  keys = (
      ["sft.optimizer"] if stage == "sft" else ["train.policy_optimizer", "train.value_optimizer"]
  )
  out = []
  for key in keys[:num_models]:
    section, name = key.split(".")
    opt = config[section][name]
    text = (
        "Adafactor factored moments"
        if opt.get("name", "adamw") == "adafactor"
        else "AdamW moments" + (", mu in bfloat16" if opt.get("mu_dtype") == "bfloat16" else "")
    )
    if text not in out:
      out.append(text)
  return "; ".join(out)


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:8.2f} GiB"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"{r['model']} ({r['params'] / 1e9:.2f}B parameters) {r['method'].upper()} step on "
      f"{r['topology']}: {r['chips']} x {r['device_kind']}, mesh {mesh}; batch {r['batch']} x "
      f"{r['seq_len']} tokens, compute {r['dtype']}, parameters and optimizer state "
      f"{'/'.join(r['state_dtypes'])}, remat {r['remat']}"
      f"{', scanned layers' if r['scan_layers'] else ''}; compiled in {r['compile_s']:.0f}s",
      "memory per chip (compiled.memory_analysis):",
      *(
          [
              f"  frozen base          {gib(r['base_params'])}   (the SFT policy, shared by "
              "both models; also the reference"
              + (f"; its projections in {r['base_qtype']}" if r.get("base_qtype") else "")
              + ")",
              f"  LoRA rank {r['lora_rank']}: {r['trained_params'] / 1e6:.2f}M trained parameters",
          ]
          if r["lora_rank"]
          else []
      ),
      f"  policy parameters    {gib(r['policy_params'])}"
      + ("   (adapters)" if r["lora_rank"] else ""),
      f"  value parameters     {gib(r['value_params'])}",
      f"  optimizer state      {gib(r['optimizer_state'])}   ({r['optimizers']})",
      "  reference parameters     0.00 GiB   (not resident: the batch carries the reference "
      "log-probs the sample stage computed)",
      f"  batch                {gib(r['batch_bytes'])}",
      f"  arguments            {gib(r['arguments'])}   (state + "
      + ("frozen base + " if r["lora_rank"] else "")
      + "batch; the state is donated)",
      f"  temporaries          {gib(r['temporaries'])}",
      f"  outputs not aliased  {gib(r['outputs'] - r['aliased'])}",
      f"  generated code       {gib(r['code'])}",
      f"  sum of the above     {gib(r['resident'])}   (arguments + temporaries + outputs + code)",
      f"  peak                 {gib(r['peak'])}   of {r['hbm'] / 2**30:.0f} GiB HBM "
      f"({100 * r['peak'] / r['hbm']:.0f}%; the compiler's peak of live buffers)",
      "FLOPs per step ("
      + ("the unrolled layers' program, lowered" if r["scan_layers"] else "compiled.cost_analysis")
      + f"): {r['flops_per_chip']:.3e} per chip, "
      f"{r['flops_per_chip'] * r['chips']:.3e} in all",
      f"at the peak {r['peak_tflops']:.0f} TFLOP/s bf16 per chip: {r['step_s']:.3f} s/step, "
      f"{r['tokens_per_s']:,.0f} tokens/s (a lower bound on time: real steps reach a fraction "
      "of peak)",
  ]
  return "\n".join(lines)


def run(config, topology: str) -> dict[str, dict]:
  """Compiles every jitted program of the stages the config runs (the SFT and train steps, the
  sampler, the reference log-probs, the evaluation's decoding) and prints each report; a
  UserError naming the first that does not fit, after the others' reports."""
  ran = config.stages.split(",")
  steps = [s for s in ("sft", "train") if s in ran]
  programs = [p for p, (stage, _, _) in PROGRAMS.items() if stage in ran]
  steps = steps or ([] if programs else ["train"])
  jobs = [(s, compile_step, format_report) for s in steps]
  jobs += [(p, compile_program, format_program_report) for p in programs]
  reports, failures = {}, []
  for name, compile_fn, format_fn in jobs:
    try:
      reports[name] = compile_fn(config, topology, name)
    except UserError as e:
      if "does not fit" not in str(e):
        raise
      failures.append(str(e))
      continue
    print(format_fn(reports[name]))
  if failures:
    raise UserError(failures[0])
  peaks = ", ".join(f"{s} {100 * r['peak'] / r['hbm']:.0f}%" for s, r in reports.items())
  print(f"every program fits on {topology}: peak per chip as a share of HBM: {peaks}")
  return reports
