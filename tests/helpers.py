"""What several test files share: a tiny model, the default config's sharding rules, optimizer
and DQO settings, random batches in the project's layout, a DQO train step to run, and what a
checkpoint saved."""

import ast
import dataclasses
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from configs.arith import get_config
from dqo_jax import sharding
from dqo_jax.model import ModelConfig, Transformer, value_params_from_policy
from dqo_jax.methods import dqo
from dqo_jax.methods.dqo import make_dqo_step
from dqo_jax.train import build
from dqo_jax.train.policy_value_step import PolicyValueState
from dqo_jax.train.state import TrainState, make_optimizer

CFG = ModelConfig(
    vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)


# The logical-axis rules of the default config, so that tests shard as a user's run does.
RULES = sharding.logical_rules(get_config().mesh)
OPT = ml_collections.ConfigDict(
    dict(lr=1e-3, warmup_steps=2, end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0, b2=0.98)
)
# The shipped `dqo` settings at beta 0.1 with bootstrapping and importance traces on (every term
# used).
DQO = dataclasses.replace(
    dqo.Settings.from_config(get_config()), beta=0.1, lam=0.95, importance_traces=True
)


def random_batch(rng, b=16, p=6, r=7):
  prompt_len = rng.integers(2, p + 1, b)
  prompt = np.zeros((b, p), np.int32)
  pmask = np.zeros((b, p), np.int32)
  for i, n in enumerate(prompt_len):
    prompt[i, p - n :] = rng.integers(4, 32, n)
    pmask[i, p - n :] = 1
  response_len = rng.integers(1, r + 1, b).astype(np.int32)
  response = rng.integers(4, 32, (b, r)).astype(np.int32)
  response[np.arange(r)[None] >= response_len[:, None]] = 0
  return dict(
      prompt=prompt,
      prompt_mask=pmask,
      response=response,
      response_len=response_len,
      reward=rng.integers(0, 2, b).astype(np.float32),
      behaviour_logprobs=-rng.uniform(0, 3, (b, r)).astype(np.float32),
      ref_logprobs=-rng.uniform(0, 3, (b, r)).astype(np.float32),
  )


init_params = build.boxed_init


def dqo_setup(grad_accum_steps=1, cfg=CFG):
  policy, value = Transformer(cfg), Transformer(cfg, head="value")
  ptx, vtx = make_optimizer(OPT, 10), make_optimizer(OPT, 10)

  def init_fn(rng):
    pp = init_params(policy, rng)
    vp = init_params(value, rng)
    vp = jax.tree.map(
        lambda b, v: b.replace_boxed(v),
        vp,
        value_params_from_policy(nn.meta.unbox(pp), nn.meta.unbox(vp)),
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    # A non-zero head, so that values (and the value gradient path) are exercised.
    vp["value_head"] = vp["value_head"].replace_boxed(
        0.1 * jax.random.normal(rng, vp["value_head"].value.shape)
    )
    return PolicyValueState(policy=TrainState.create(pp, ptx), value=TrainState.create(vp, vtx))

  step = make_dqo_step(policy, value, ptx, vtx, DQO, grad_accum_steps=grad_accum_steps)
  return init_fn, step, policy, value


def saved_arrays(checkpoints) -> list[tuple[str, ...]]:
  """The paths of the arrays Orbax saved in the newest step of a `checkpoints/` directory
  (steps and optimizer counters left out)."""
  step = max(int(d.name) for d in checkpoints.iterdir() if d.name.isdigit())
  with open(checkpoints / str(step) / "default" / "_METADATA") as f:
    saved = [ast.literal_eval(k) for k in json.load(f)["tree_metadata"]]
  return [k for k in saved if k[-1] not in ("step", "count") and not k[-1].isdigit()]
