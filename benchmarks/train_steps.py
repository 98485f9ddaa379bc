"""Train-step time and peak memory: DQO against its floor, SFT and DPO, on one Llama-style model.

The DQO step's floor is what it cannot avoid: one forward+backward of the policy plus one of the
value model on the same batch (each jitted alone; their times summed). The step adds the
lambda-return targets, the two losses, two AdamW updates and its metrics; target ratio <= 1.15.
SFT and DPO are timed on the same batch (DPO reads it as 8 chosen/rejected pairs). Peak memory
is XLA's `memory_analysis()` of each compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.timing import interleaved, median_ratio, row
from configs.arith import get_config
from dqo_jax.model import ModelConfig, Transformer, value_params_from_policy
from dqo_jax.train import policy_step
from dqo_jax.train.forward import response_logprobs, response_mask, response_values
from dqo_jax.methods import dpo
from dqo_jax.methods import dqo as dqo_method
from dqo_jax.methods.dqo import make_dqo_step
from dqo_jax.train.policy_value_step import PolicyValueState
from dqo_jax.train.state import TrainState, make_optimizer

# (model, batch, prompt length, response length, timed rounds)
SIZES = dict(
    quick=(
        dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=688),
        16,
        64,
        192,
        3,
    ),
    full=(
        dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1376),
        16,
        128,
        384,
        7,
    ),
    tiny=(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64), 4, 4, 8, 1),
)
VOCAB = 4096
OPT = ml_collections.ConfigDict(
    dict(lr=1e-5, warmup_steps=10, end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0, b2=0.98)
)


# The shipped `dqo` settings with importance traces on (the costlier targets).
DQO = dataclasses.replace(
    dqo_method.Settings.from_config(get_config()), beta=0.1, lam=0.95, importance_traces=True
)


def make_batch(b: int, p: int, r: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  prompt_len = rng.integers(p // 2, p + 1, b)
  response_len = rng.integers(r // 2, r + 1, b).astype(np.int32)
  prompt_mask = (np.arange(p)[None] >= p - prompt_len[:, None]).astype(np.int32)
  response = rng.integers(4, VOCAB, (b, r)).astype(np.int32)
  response[np.arange(r)[None] >= response_len[:, None]] = 0
  return jax.tree.map(
      jnp.asarray,
      dict(
          prompt=rng.integers(4, VOCAB, (b, p)).astype(np.int32) * prompt_mask,
          prompt_mask=prompt_mask,
          response=response,
          response_len=response_len,
          reward=rng.integers(0, 2, b).astype(np.float32),
          behaviour_logprobs=-rng.uniform(0, 3, (b, r)).astype(np.float32),
          ref_logprobs=-rng.uniform(0, 3, (b, r)).astype(np.float32),
      ),
  )


def _cost(compiled, key: str) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost).get(key, 0.0)


def peak_mib(compiled) -> float:
  """Arguments + outputs + temporaries - donated aliases: XLA's buffer assignment for the step.
  (On CPU `peak_memory_in_bytes` counts the arguments only, so the larger of the two is taken.)"""
  m = compiled.memory_analysis()
  live = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return max(m.peak_memory_in_bytes, live - m.alias_size_in_bytes) / 2**20


class _Stepper:
  """A jitted train step with its state donated and carried from call to call, as in `fit`."""

  def __init__(self, step, state, batch):
    self.compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    self.state, self.batch = state, batch

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics


def _models_and_params(cfg: ModelConfig, logprob_chunk: int = 0):
  policy = Transformer(cfg, head="lm", logprob_chunk=logprob_chunk)
  value = Transformer(cfg, head="value")
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = lambda m, seed: nn.meta.unbox(m.init(jax.random.key(seed), tokens, tokens + 1)["params"])
  policy_params = init(policy, 0)
  return policy, value, policy_params, value_params_from_policy(policy_params, init(value, 1))


def _dqo_stepper(cfg: ModelConfig, batch, logprob_chunk: int = 0) -> _Stepper:
  policy, value, policy_params, value_params = _models_and_params(cfg, logprob_chunk)
  tx = make_optimizer(OPT, 1000)
  return _Stepper(
      make_dqo_step(policy, value, tx, tx, DQO),
      # Copies: the value model's trunk is the policy's arrays, and both states are donated.
      PolicyValueState(
          policy=TrainState.create(jax.tree.map(jnp.copy, policy_params), tx),
          value=TrainState.create(jax.tree.map(jnp.copy, value_params), tx),
      ),
      batch,
  )


def _sft_stepper(cfg: ModelConfig, batch, logprob_chunk: int = 0) -> _Stepper:
  policy, _, policy_params, _ = _models_and_params(cfg, logprob_chunk)
  tx = make_optimizer(OPT, 1000)
  return _Stepper(
      policy_step.make_sft_step(policy, tx), TrainState.create(policy_params, tx), batch
  )


def steps_and_floors(size: str):
  """{name: (zero-argument call, compiled)} for the steps and the two forward+backward passes."""
  model_kwargs, b, p, r, _ = SIZES[size]
  cfg = ModelConfig(vocab_size=VOCAB, **model_kwargs)
  batch = make_batch(b, p, r)
  policy, value, policy_params, value_params = _models_and_params(cfg)
  tx = make_optimizer(OPT, 1000)
  new_state = lambda params: TrainState.create(jax.tree.map(jnp.copy, params), tx)
  # The floor: gradients of the simplest losses of each model's outputs, nothing else. The batch
  # is an argument, as it is to the steps, so that XLA cannot fold it in as a constant.
  masked_sum = lambda x, batch: jnp.sum(x * response_mask(batch))
  policy_grad = jax.grad(lambda w, b: masked_sum(response_logprobs(policy, w, b), b))
  value_grad = jax.grad(lambda w, b: masked_sum(jnp.square(response_values(value, w, b)), b))
  floors = {
      name: (jax.jit(fn).lower(params, batch).compile(), params)
      for name, fn, params in (
          ("policy fwd+bwd", policy_grad, policy_params),
          ("value fwd+bwd", value_grad, value_params),
      )
  }
  steppers = dict(
      dqo=_dqo_stepper(cfg, batch),
      sft=_Stepper(policy_step.make_sft_step(policy, tx), new_state(policy_params), batch),
      dpo=_Stepper(
          policy_step.make_policy_step(policy, tx, dpo.objective(0.1)),
          new_state(policy_params),
          batch,
      ),
  )
  calls = {name: (s, s.compiled) for name, s in steppers.items()}
  calls.update({name: (functools.partial(c, w, batch), c) for name, (c, w) in floors.items()})
  return calls, b * (p + r)


def rows(quick: bool, size: str | None = None) -> list[dict]:
  size = size or ("quick" if quick else "full")
  calls, tokens = steps_and_floors(size)
  model_kwargs, b, p, r, repeats = SIZES[size]
  times = interleaved({name: fn for name, (fn, _) in calls.items()}, repeats)
  med = {name: statistics.median(t) for name, t in times.items()}
  floor = [pv + vv for pv, vv in zip(times["policy fwd+bwd"], times["value fwd+bwd"])]
  peak = {name: peak_mib(compiled) for name, (_, compiled) in calls.items()}
  # Where the step's extra time could come from: XLA's count of its work against the floor's.
  extra = {
      key: _cost(calls["dqo"][1], key)
      / (_cost(calls["policy fwd+bwd"][1], key) + _cost(calls["value fwd+bwd"][1], key))
      for key in ("flops", "bytes accessed")
  }
  shape = (
      f"d_model {model_kwargs['d_model']}, {model_kwargs['n_layers']} layers, vocab {VOCAB}, "
      f"batch {b} x (prompt {p} + response {r})"
  )
  out = [
      row(
          "DQO step / (policy + value fwd+bwd)",
          med["dqo"] * 1e3,
          baseline=statistics.median(floor) * 1e3,
          ratio=median_ratio(times["dqo"], floor),
          target=1.15,
          unit="ms",
          notes=(
              f"{tokens / med['dqo']:,.0f} tokens/s; {shape}; XLA cost analysis of the step vs"
              f" the floor: flops x{extra['flops']:.4f}, bytes accessed"
              f" x{extra['bytes accessed']:.3f}"
          ),
      )
  ]
  for name, label in (("sft", "SFT"), ("dpo", "DPO")):
    out.append(
        row(
            f"{label} step / policy fwd+bwd",
            med[name] * 1e3,
            baseline=med["policy fwd+bwd"] * 1e3,
            ratio=median_ratio(times[name], times["policy fwd+bwd"]),
            unit="ms",
            notes=f"{tokens / med[name]:,.0f} tokens/s; same batch"
            + ("" if name == "sft" else " as 8 pairs"),
        )
    )
  for name, label, base in (
      ("dqo", "DQO", peak["policy fwd+bwd"] + peak["value fwd+bwd"]),
      ("sft", "SFT", peak["policy fwd+bwd"]),
      ("dpo", "DPO", peak["policy fwd+bwd"]),
  ):
    out.append(
        row(
            f"peak memory {label} step",
            peak[name],
            baseline=base,
            ratio=peak[name] / base,
            unit="MiB",
            notes="memory_analysis() of the compiled step; baseline: its fwd+bwd pass(es)' peaks",
        )
    )
  return out + chunked_logprob_rows(size)


LARGE_VOCAB = 32_768


def chunked_logprob_rows(size: str) -> list[dict]:
  """The DQO step at a 32k-entry vocabulary: response log-probs from the whole [B, R, V] logits
  against `model.logprob_chunk = 16` positions at a time (recomputed in the backward pass). Peak
  memory is the target; the time ratio is the recomputation's price. The value model's forward
  and backward pass, which has no logits, shows the floor the trunk sets."""
  model_kwargs, b, p, r, repeats = SIZES[size]
  cfg = ModelConfig(vocab_size=LARGE_VOCAB, **model_kwargs)
  batch = make_batch(b, p, r)
  chunk = min(16, r // 2)
  steppers = {"whole": _dqo_stepper(cfg, batch), "chunked": _dqo_stepper(cfg, batch, chunk)}
  times = interleaved(steppers, repeats)
  peak = {name: peak_mib(s.compiled) for name, s in steppers.items()}
  # The SFT step holds one model: the logits are a larger share of what it holds.
  sft_peak = {
      name: peak_mib(_sft_stepper(cfg, batch, c).compiled)
      for name, c in (("whole", 0), ("chunked", chunk))
  }
  _, value, _, value_params = _models_and_params(cfg)
  value_grad = jax.grad(lambda w, b: jnp.sum(response_values(value, w, b) * response_mask(b)))
  trunk = peak_mib(jax.jit(value_grad).lower(value_params, batch).compile())
  shape = (
      f"d_model {model_kwargs['d_model']}, {model_kwargs['n_layers']} layers, vocab "
      f"{LARGE_VOCAB}, batch {b} x (prompt {p} + response {r}), logprob_chunk {chunk}"
  )
  trunk_note = f"; the value model's fwd+bwd alone (no logits): {trunk:,.0f} MiB"
  return [
      *(
          row(
              f"peak memory {label} step, chunked log-probs / whole logits",
              mib["chunked"],
              baseline=mib["whole"],
              ratio=mib["chunked"] / mib["whole"],
              target=0.6,
              unit="MiB",
              notes=f"memory_analysis() of the compiled steps; {shape}{extra}",
          )
          for label, mib, extra in (("DQO", peak, trunk_note), ("SFT", sft_peak, ""))
      ),
      row(
          "DQO step time, chunked log-probs / whole logits",
          statistics.median(times["chunked"]) * 1e3,
          baseline=statistics.median(times["whole"]) * 1e3,
          ratio=median_ratio(times["chunked"], times["whole"]),
          unit="ms",
          notes=f"interleaved, {repeats} rounds; {shape}",
      ),
  ]
