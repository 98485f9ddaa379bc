"""A method's train step built from the config, the architecture and the mesh alone: what the
`train` stage runs and what `--compile_only` compiles for a TPU slice, from one function
(`build_train_step`), as MaxText's training and AOT compilation share theirs.

The state starts from the SFT policy (`init_fn(rng, sft_params)`); DQO and DRO add a value model
with the SFT trunk and a fresh zero head. With LoRA (`config.model.lora`, dqo_jax/lora.py) the
state holds only the adapters (and the value head) and their optimizer state; the SFT policy is
the frozen base, passed to the step as a third argument (`step_fn(state, batch, base)`) and held
once for both models. Nothing here reads a workdir, data or weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax.linen import meta

from dqo_jax import lora, methods, sharding
from dqo_jax import rng as streams
from dqo_jax.data.offline import offline_arrays
from dqo_jax.data.views import process_arrays
from dqo_jax.model import ModelConfig, Transformer, stack_layers, value_params_from_policy
from dqo_jax.train import policy_step
from dqo_jax.train.loop import abstract_state
from dqo_jax.train.policy_value_step import PolicyValueState, make_policy_value_step
from dqo_jax.train.state import TrainState, make_optimizer


def models(config, model_cfg: ModelConfig) -> tuple[Transformer, Transformer]:
  """The policy (language-model head) and the value model (scalar head) of `config.model`."""
  remat = config.model.get("remat", "none")
  policy = Transformer(
      model_cfg, head="lm", remat=remat, logprob_chunk=config.model.get("logprob_chunk", 0)
  )
  return policy, Transformer(model_cfg, head="value", remat=remat)


def adapted(config, model: Transformer, stage: str = "train", quantized=True) -> Transformer:
  """`model` with the adapters of `config.model.lora`, or itself where `stage` has none;
  `quantized` False: over a float base whatever `base_qtype` says (`lora.adapt`)."""
  if not lora.enabled(config, stage):
    return model
  return lora.adapt(model, config.model.lora, quantized)


def fresh_adapters(config, model: Transformer, rng, stage: str = "train", trained=lora.is_adapter):
  """Fresh adapters of `model` for `stage` (B = 0) and, with `trained`, whatever else trains."""
  return lora.split(boxed_init(adapted(config, model, stage, quantized=False), rng), trained)[1]


def dropout_key(config, stage: str):
  """The key of `stage`'s adapter dropout masks (`model.lora.dropout`), None without."""
  if not lora.enabled(config, stage) or not config.model.lora.dropout:
    return None
  return streams.key(config.seed, f"{stage}.lora_dropout")


def _trains_value_leaf(path) -> bool:
  return lora.is_adapter(path) or path == ("value_head",)


def boxed_init(model: Transformer, rng):
  """Fresh parameters boxed with their logical axis names. Scanned layers (`model.scan_layers`)
  get their per-layer twin's values, stacked: one seed gives the same weights in either layout."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda m: m.init(rng, tokens, jnp.ones_like(tokens))["params"]
  if not model.cfg.scan_layers:
    return init(model)
  per_layer = init(model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False)))
  stacked = stack_layers(meta.unbox(per_layer), model.cfg.n_layers)
  return sharding.rebox(jax.eval_shape(lambda: init(model)), stacked)


def value_params_from(value_model: Transformer, policy_params, rng):
  """The value model: the policy's trunk with a fresh (zero) scalar head, boxed."""
  boxed = boxed_init(value_model, rng)
  return sharding.rebox(boxed, value_params_from_policy(policy_params, meta.unbox(boxed)))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """`init_fn(rng, sft_params)` -> the method's fresh state (boxed); `step_fn(state, batch)` ->
  (state, metrics); the abstract state (with its shardings) and batch for compiling it."""

  config: object
  policy_model: Transformer
  mesh: object
  init_fn: Callable
  make_step: Callable[[], Callable]  # built on first use: restoring a state needs no objective
  takes_sft_params: bool = True  # init_fn(rng, sft_params), or init_fn(rng) for SFT itself
  # (config, batch sharding) -> the full-width batch the step is compiled for.
  batch_shapes: Callable | None = None  # None: `abstract_batch`, the train stage's
  # LoRA: the model with adapters, whose state holds only them; step_fn(state, batch, base).
  adapted_model: Transformer | None = None

  @property
  def adapters(self) -> bool:
    return self.adapted_model is not None

  @property
  def quantized_base(self) -> bool:
    """QLoRA: the frozen base's projections are stored quantized (`model.lora.base_qtype`)."""
    return self.adapters and bool(self.config.model.lora.base_qtype)

  @functools.cached_property
  def step_fn(self) -> Callable:
    return self.make_step()

  @functools.cached_property
  def _abstract(self):
    args = ()
    if self.takes_sft_params:
      key = jax.random.key(0)
      args = (jax.eval_shape(lambda: meta.unbox(boxed_init(self.policy_model, key))),)
    return abstract_state(self.init_fn, self.mesh, sharding.logical_rules(self.config.mesh), args)

  @property
  def abstract_state(self):
    return self._abstract[0]

  @property
  def state_shardings(self):
    return self._abstract[1]

  @property
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = self.batch_shapes or abstract_batch
    return shapes(self.config, sharding.batch_sharding(self.mesh))

  @functools.cached_property
  def _abstract_base(self):
    # The adapted model's parameters less its adapters: with QLoRA, the quantized kernels.
    init = lambda rng: lora.split(boxed_init(self.adapted_model, rng))[0]
    return abstract_state(init, self.mesh, sharding.logical_rules(self.config.mesh))

  @property
  def abstract_base(self):
    """The frozen base's shapes and shardings (an adapter run), else None."""
    return self._abstract_base[0] if self.adapters else None

  @property
  def base_shardings(self):
    return self._abstract_base[1] if self.adapters else None

  @functools.cached_property
  def plain_shardings(self):
    """The shardings of the plain policy's parameters (what `base_of` takes)."""
    init = lambda rng: boxed_init(self.policy_model, rng)
    return abstract_state(init, self.mesh, sharding.logical_rules(self.config.mesh))[1]

  def base_of(self, params):
    """The frozen base the step reads, from the plain (unboxed) parameters it adapts: with
    `model.lora.base_qtype`, their targeted kernels quantized; None without adapters."""
    if not self.adapters:
      return None
    if not self.quantized_base:
      return params
    quantize = lambda p: lora.quantize_base(self.policy_model, p, self.config.model.lora)
    return jax.jit(quantize, out_shardings=self.base_shardings)(params)

  def policy_params(self, state, base=None):
    """The policy's plain parameters in `state`: with adapters, folded into `base`
    (`base_of`'s)."""
    params = policy_of(state)
    if not self.adapters:
      return params
    return lora.fold(lora.merge(base, params), self.config.model.lora)


def build_train_step(config, model_cfg: ModelConfig, mesh, view: methods.View | None = None):
  """The `train` stage's step of `config.method`; `view` is the method's data where its
  objective depends on it (KTO's class weights), None where the config suffices or where only
  the state is wanted (`step_fn` is built on first use)."""
  method = methods.of(config)
  t = config.train
  policy_model, value_model = models(config, model_cfg)
  policy_lora, value_lora = adapted(config, policy_model), adapted(config, value_model)
  adapters = lora.enabled(config, "train")
  policy_tx = make_optimizer(t.policy_optimizer, t.steps - method.value_warmup(config))
  objective = lambda: method.objective(config, view)
  accum = t.grad_accum_steps

  def policy_params(rng, sft_params):
    if adapters:  # fresh adapters (B = 0: the SFT policy itself)
      return fresh_adapters(config, policy_model, rng)
    return sharding.rebox(boxed_init(policy_model, rng), sft_params)

  built = functools.partial(
      TrainStep, config, policy_model, mesh, adapted_model=policy_lora if adapters else None
  )
  if not method.trains_value:
    policy_only = lambda rng, sft_params: TrainState.create(
        policy_params(rng, sft_params), policy_tx
    )
    step = lambda: policy_step.make_policy_step(
        policy_lora, policy_tx, objective(), accum, dropout_key=dropout_key(config, "train")
    )
    return built(policy_only, step)
  value_tx = make_optimizer(t.value_optimizer, t.steps)

  def policy_and_value(rng, sft_params):
    policy_rng, value_rng = jax.random.split(rng)
    if adapters:  # adapters and a fresh zero head over the SFT trunk
      value = fresh_adapters(config, value_model, value_rng, trained=_trains_value_leaf)
    else:
      value = value_params_from(value_model, sft_params, value_rng)
    return PolicyValueState(
        policy=TrainState.create(policy_params(policy_rng, sft_params), policy_tx),
        value=TrainState.create(value, value_tx),
    )

  step = lambda: make_policy_value_step(
      policy_lora,
      value_lora,
      policy_tx,
      value_tx,
      objective(),
      method.value_warmup(config),
      accum,
      dropout_key(config, "train"),
  )
  return built(policy_and_value, step)


def build_sft_step(
    config, model_cfg: ModelConfig, mesh, initial_params=None, initial_adapters=None
) -> TrainStep:
  """The `sft` stage's step: the negative log-likelihood of the gold solutions, from
  `initial_params(rng)` (boxed: a pretrained model's weights) or fresh parameters; with LoRA
  those are the frozen base of fresh adapters, or of `initial_adapters()` (unboxed: a PEFT
  adapter's, `model.lora.init_from`)."""
  policy_model, _ = models(config, model_cfg)
  tx = make_optimizer(config.sft.optimizer, config.sft.steps)
  adapters = lora.enabled(config, "sft")
  model = adapted(config, policy_model, "sft")
  if adapters:  # the initial parameters are the frozen base (`base_of`)

    def init(rng):
      fresh = fresh_adapters(config, policy_model, rng, "sft")
      if initial_adapters is not None:
        fresh = sharding.rebox(fresh, initial_adapters())
      return TrainState.create(fresh, tx)

  else:
    initial = initial_params or (lambda rng: boxed_init(policy_model, rng))
    init = lambda rng: TrainState.create(initial(rng), tx)
  step = lambda: policy_step.make_sft_step(
      model, tx, config.sft.grad_accum_steps, dropout_key(config, "sft")
  )
  return TrainStep(
      config,
      policy_model,
      mesh,
      init,
      step,
      takes_sft_params=False,
      batch_shapes=abstract_sft_batch,
      adapted_model=model if adapters else None,
  )


def abstract_sft_batch(config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a full-width SFT batch: `sft.batch_size` gold solutions."""
  d, b = config.data, int(config.sft.batch_size)
  shapes = dict(
      prompt=(b, d.max_prompt_len),
      prompt_mask=(b, d.max_prompt_len),
      response=(b, d.max_response_len),
      response_len=(b,),
  )
  return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=batch_sharding) for k, s in shapes.items()}


def abstract_batch(config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a full-width training batch of `config.method`, from the arrays the
  views draw their batches from (`train.batch_size` examples of `rows_per_example` rows)."""
  d = config.data
  record = dict(
      prompt=[0],
      response=[0],
      behaviour_logprobs=[0.0],
      ref_logprobs=[0.0],
      reward=0.0,
      correct=False,
      finish="eos",
  )
  arrays = offline_arrays([record], d, pad_id=0)
  method = methods.of(config)
  if method.needs_rollouts(config):
    potentials = [dict(boundaries=[], potentials=[0.0])]
    arrays.update(process_arrays(potentials, arrays["response_len"], d.max_response_len))
  rows = int(config.train.batch_size) * method.rows_per_example
  return {
      k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=batch_sharding)
      for k, v in arrays.items()
  }


def policy_of(state):
  """The policy's parameters in a method's state."""
  return state.policy.params if isinstance(state, PolicyValueState) else state.params
