"""What every stage needs: the config, the workdir, data, tokenizer, models and the mesh."""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqo_jax import convert, sharding
from dqo_jax.checkpoint import restore_params
from dqo_jax.data import arith_tfds
from dqo_jax.data.batches import Encoded, encode_examples
from dqo_jax.model import ModelConfig, Transformer, value_params_from_policy
from dqo_jax.tokenizer import Tokenizer, load_or_train_tokenizer, load_tokenizer
from dqo_jax.train.loop import abstract_state
from dqo_jax.train.state import TrainState, make_optimizer

STAGES = ("sft", "sample", "dqo", "eval")


@dataclasses.dataclass
class Context:
  config: object
  workdir: str
  tokenizer: Tokenizer
  train: Encoded
  test: Encoded
  mesh: object

  @property
  def rules(self):
    return sharding.logical_rules(self.config.mesh)

  @functools.cached_property
  def model_cfg(self) -> ModelConfig:
    if self.config.model.get("path"):  # a pretrained model (dqo_jax.convert.load_pretrained)
      return convert.pretrained_config(self.config.model.path, self.config.model.dtype)
    return ModelConfig.from_config(self.config.model, self.tokenizer.vocab_size)

  @functools.cached_property
  def policy_model(self) -> Transformer:
    return Transformer(self.model_cfg, head="lm")

  @functools.cached_property
  def value_model(self) -> Transformer:
    return Transformer(self.model_cfg, head="value")

  def stage_dir(self, stage: str) -> str:
    path = os.path.join(self.workdir, stage)
    os.makedirs(path, exist_ok=True)
    return path

  def init_params(self, model: Transformer, rng):
    """Freshly initialised parameters, boxed with their logical axis names; the pretrained
    checkpoint's for the policy when `config.model.path` is set."""
    if self.config.model.get("path") and model.head == "lm":
      return self._pretrained_params
    tokens = jnp.zeros((1, 8), jnp.int32)
    return model.init(rng, tokens, jnp.ones_like(tokens))["params"]

  @functools.cached_property
  def _pretrained_params(self):
    path, dtype = self.config.model.path, self.config.model.dtype
    return convert.load_pretrained_params(path, self.mesh, self.rules, compute_dtype=dtype)[1]

  def sft_init_fn(self):
    tx = make_optimizer(self.config.sft.optimizer, self.config.sft.steps)
    return lambda rng: TrainState.create(self.init_params(self.policy_model, rng), tx), tx

  def sft_abstract_state(self):
    init_fn, _ = self.sft_init_fn()
    return abstract_state(init_fn, self.mesh, self.rules)[0]

  def sft_params(self):
    """The SFT policy: the reference policy and DQO's starting point."""
    checkpoints = os.path.join(self.workdir, "sft", "checkpoints")
    return restore_params(checkpoints, self.sft_abstract_state()).params

  def value_params_from(self, policy_params, rng):
    """The value model: the policy's trunk with a fresh (zero) scalar head, boxed."""
    boxed = self.init_params(self.value_model, rng)
    return rebox(boxed, value_params_from_policy(policy_params, nn.meta.unbox(boxed)))


def rebox(boxed, values):
  """`values` wrapped in the logical-partitioning boxes of `boxed` (same tree structure)."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree.map(
      lambda box, v: box.replace_boxed(v) if is_box(box) else v, boxed, values, is_leaf=is_box
  )


def build_context(config, workdir: str) -> Context:
  d = config.data
  if d.task != "arith":
    raise ValueError(f"config.data.task={d.task!r}: only 'arith' is available so far")
  data_dir = d.dir or os.path.join(workdir, "data")
  params = dict(
      num_train=d.num_train,
      num_test=d.num_test,
      seed=d.seed,
      min_steps=d.min_steps,
      max_steps=d.max_steps,
      max_operand=d.max_operand,
      max_result=d.max_result,
  )
  splits = arith_tfds.load_arith(data_dir, **params)
  tok_path = os.path.join(
      arith_tfds.arith_builder(data_dir, **params).data_dir,
      f"tokenizer_{config.tokenizer.vocab_size}.model",
  )
  texts = lambda: [t for ex in splits["train"] for t in (ex["question"], ex["solution"])]
  if config.model.get("path"):
    tok = load_tokenizer(config.model.path)
  else:
    tok = load_or_train_tokenizer(tok_path, texts, config.tokenizer.vocab_size)
  enc = {
      s: encode_examples(tok, splits[s], d.max_prompt_len, d.max_response_len)
      for s in ("train", "test")
  }
  for s, e in enc.items():
    if e.dropped:
      print(
          f"[data] {s}: dropped {e.dropped} of {e.dropped + len(e)} examples longer than "
          f"data.max_prompt_len={d.max_prompt_len}/max_response_len={d.max_response_len}"
      )
  mesh = sharding.make_mesh(config.mesh)
  return Context(config, workdir, tok, enc["train"], enc["test"], mesh)
