"""The jitted train steps: sharded over 8 simulated devices they compute what one device does,
and the DQO step's single-pass gradients equal plain autodiff of its losses."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dqo_jax import losses, sharding
from dqo_jax.errors import UserError
from dqo_jax.model import Transformer, unstack_layers
from dqo_jax.train import policy_step
from dqo_jax.train.forward import response_logprobs, response_mask, response_values
from dqo_jax.train.loop import abstract_state, init_state, jit_step
from dqo_jax.train.policy_step import make_sft_step
from dqo_jax.methods import dpo, dqo, dro, kto
from dqo_jax.methods.dqo import make_dqo_step
from dqo_jax.train.policy_value_step import PolicyValueState as DQOState
from dqo_jax.train.policy_value_step import make_policy_value_step
from dqo_jax.train.state import TrainState, make_optimizer
from helpers import CFG, DQO, OPT, RULES, dqo_setup, init_params, random_batch


def _run(init_fn, step_fn, mesh_shape, batches):
  mesh = sharding.make_mesh(
      dict(zip(sharding.MESH_AXES, mesh_shape)), devices=jax.devices()[: int(np.prod(mesh_shape))]
  )
  _, shardings = abstract_state(init_fn, mesh, RULES)
  state = init_state(init_fn, jax.random.key(0), shardings)
  step = jit_step(step_fn, shardings, mesh, RULES)
  out = []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    out.append({k: float(v) for k, v in metrics.items()})
  return state, out


@functools.cache
def _dqo_reference():
  """Three DQO steps on one device: what every mesh must reproduce."""
  init_fn, step_fn, _, _ = dqo_setup()
  rng = np.random.default_rng(0)
  batches = [random_batch(rng) for _ in range(3)]
  return batches, _run(init_fn, step_fn, (1, 1, 1), batches)


def _assert_same_run(ref, got, rtol=2e-4):
  (state_a, metrics_a), (state_b, metrics_b) = ref, got
  for a, b in zip(metrics_a, metrics_b):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)
  for name in ("policy", "value"):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
        getattr(state_a, name).params,
        getattr(state_b, name).params,
    )


# Per mesh (data, fsdp, tensor): the per-device block of the embedding [vocab 32, embed 32], of
# an MLP weight [embed 32, mlp 64] and of the query weight [embed 32, heads 4, head_dim 8].
# On (1, 1, 8) the 4 heads do not divide over tensor=8 and stay whole (replicated).
MESH_BLOCKS = {
    (8, 1, 1): ((32, 32), (32, 64), (32, 4, 8)),
    (2, 4, 1): ((32, 8), (8, 64), (8, 4, 8)),
    (1, 4, 2): ((16, 8), (8, 32), (8, 2, 8)),
    (1, 1, 8): ((4, 32), (32, 8), (32, 4, 8)),
}


@pytest.mark.parametrize("mesh_shape", sorted(MESH_BLOCKS), ids=lambda m: "x".join(map(str, m)))
def test_dqo_step_on_8_device_meshes_matches_one_device(mesh_shape):
  assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
  init_fn, step_fn, _, _ = dqo_setup()
  batches, ref = _dqo_reference()
  state, metrics = _run(init_fn, step_fn, mesh_shape, batches)
  _assert_same_run(ref, (state, metrics))
  params = state.policy.params
  layer = params["layer_0"]
  arrays = (params["embed"], layer["mlp"]["up"]["kernel"], layer["attn"]["q"]["kernel"])
  blocks = tuple(a.sharding.shard_shape(a.shape) for a in arrays)
  assert blocks == MESH_BLOCKS[mesh_shape]
  if mesh_shape == (1, 4, 2):
    assert layer["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_scanned_layers_dqo_steps_on_a_sharded_mesh_match_the_unrolled_ones():
  """`model.scan_layers`: the same seed gives the same weights stacked, and three DQO steps on a
  (1, 4, 2) mesh the same losses and weights as the unrolled blocks on one device."""
  init_fn, step_fn, _, _ = dqo_setup(cfg=dataclasses.replace(CFG, scan_layers=True))
  batches, (ref_state, ref_metrics) = _dqo_reference()
  state, metrics = _run(init_fn, step_fn, (1, 4, 2), batches)
  kernel = state.policy.params["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")  # the layer axis stays whole
  per_layer = lambda s: s.replace(params=unstack_layers(s.params))
  state = state.replace(policy=per_layer(state.policy), value=per_layer(state.value))
  _assert_same_run((ref_state, ref_metrics), (state, metrics))


def test_dqo_gradient_accumulation_matches_the_full_batch():
  """Four micro-batches of 8 rows on a (2, 4, 1) mesh: the same losses, logged statistics and
  parameters as the whole 32-row batch, although the token-mean losses and the logged means
  normalise by the token count of the whole batch."""
  rng = np.random.default_rng(5)
  batches = [random_batch(rng, b=32) for _ in range(2)]
  runs = []
  for k in (1, 4):
    init_fn, step_fn, _, _ = dqo_setup(grad_accum_steps=k)
    runs.append(_run(init_fn, step_fn, (2, 4, 1), batches))
  _assert_same_run(*runs)


def test_kto_gradient_accumulation_matches_the_full_batch():
  """KTO's z0 is a statistic of the whole batch's mismatched half; micro-batches of 4 rows mix
  both halves, and must still give the full-batch step."""
  batch = _method_batch("kto")
  runs = []
  for k in (1, 4):
    init_fn, step_fn = _policy_setup(kto.objective(0.5, 1.0, 1.0), k)
    runs.append(_run(init_fn, step_fn, (1, 1, 1), [batch] * 2))
  (state_a, metrics_a), (state_b, metrics_b) = runs
  for a, b in zip(metrics_a, metrics_b):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, err_msg=key)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
      state_a.params,
      state_b.params,
  )


def test_gradient_accumulation_must_divide_the_batch():
  init_fn, step_fn, _, _ = dqo_setup(grad_accum_steps=3)
  state = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
  with pytest.raises(UserError, match="config.train.grad_accum_steps=3 .* divisor of 16"):
    jax.eval_shape(step_fn, state, random_batch(np.random.default_rng(0)))


def test_sft_step_on_8_devices_matches_one_device_and_learns():
  model = Transformer(CFG)
  tx = make_optimizer(ml_collections.ConfigDict(dict(OPT, lr=1e-2)), 30)
  init_fn = lambda rng: TrainState.create(init_params(model, rng), tx)
  rng = np.random.default_rng(1)
  batch = random_batch(rng)
  _, m1 = _run(init_fn, make_sft_step(model, tx), (1, 1, 1), [batch] * 30)
  _, m8 = _run(init_fn, make_sft_step(model, tx), (2, 4, 1), [batch] * 3)
  for a, b in zip(m1[:3], m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-4)
  assert m1[-1]["loss"] < 0.5 * m1[0]["loss"]


def test_dqo_step_gradients_equal_autodiff_of_the_losses():
  """One forward per model with vjp must give the gradients of L_Q (policy) and L_V (value)."""
  init_fn, _, policy, value = dqo_setup()
  state = nn.meta.unbox(init_fn(jax.random.key(0)))
  batch = jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(2)))
  captured = {}

  class Capture:  # an optimizer that records the gradients it is given

    def __init__(self, name):
      self.name = name

    def update(self, grads, opt_state, params):
      captured[self.name] = grads
      return jax.tree.map(jnp.zeros_like, grads), opt_state

  step = make_dqo_step(policy, value, Capture("policy"), Capture("value"), DQO)
  step(state, batch)

  mask = response_mask(batch).astype(jnp.float32)
  rewards = losses.place_outcome_rewards(batch["reward"], batch["response_len"], mask.shape[1])
  lp = response_logprobs(policy, state.policy.params, batch)
  v = response_values(value, state.value.params, batch)
  g = losses.soft_lambda_returns(
      rewards,
      v,
      lp,
      batch["ref_logprobs"],
      mask,
      beta=DQO.beta,
      lam=DQO.lam,
      behaviour_logprobs=batch["behaviour_logprobs"],
  )
  q = lambda p: losses.dqo_q_loss(
      response_logprobs(policy, p, batch),
      batch["ref_logprobs"],
      v,
      rewards,
      g,
      mask,
      beta=DQO.beta,
      lam=DQO.lam,
  )
  vl = lambda p: losses.dqo_value_loss(response_values(value, p, batch), g, mask)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
      captured["policy"],
      jax.grad(q)(state.policy.params),
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
      captured["value"],
      jax.grad(vl)(state.value.params),
  )
  assert float(optax_norm(captured["value"])) > 0 and float(optax_norm(captured["policy"])) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_dqo_step_logs_the_soft_advantage():
  """Without traces the logged advantage is G_t - V(s_t); at lambda = 1, G_t is the Monte-Carlo
  soft return, checked here against numpy."""
  init_fn, _, policy, value = dqo_setup()
  cfg = dataclasses.replace(DQO, importance_traces=False, lam=1.0)
  state = nn.meta.unbox(init_fn(jax.random.key(0)))
  batch = jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(3)))
  tx = make_optimizer(OPT, 10)
  _, metrics = make_dqo_step(policy, value, tx, tx, cfg)(state, batch)
  lp = np.asarray(response_logprobs(policy, state.policy.params, batch), np.float64)
  v = np.asarray(response_values(value, state.value.params, batch), np.float64)
  adv = []
  for i, n in enumerate(np.asarray(batch["response_len"])):
    soft = -cfg.beta * (lp[i, :n] - np.asarray(batch["ref_logprobs"])[i, :n])
    soft[n - 1] += float(batch["reward"][i])
    g = np.cumsum(soft[::-1])[::-1]
    adv.extend(g - v[i, :n])
  np.testing.assert_allclose(float(metrics["advantage_mean"]), np.mean(adv), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics["advantage_std"]), np.std(adv), rtol=1e-3, atol=1e-6)


def test_value_warmup_freezes_the_policy_then_releases_it():
  init_fn, _, policy, value = dqo_setup()
  cfg = dataclasses.replace(DQO, value_warmup_steps=2)
  tx = make_optimizer(OPT, 10)
  step = jax.jit(make_dqo_step(policy, value, tx, tx, cfg))
  state = nn.meta.unbox(init_fn(jax.random.key(0)))
  rng = np.random.default_rng(4)
  changed = lambda a, b: any(
      not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  history = [state]
  for _ in range(4):
    state, _ = step(state, jax.tree.map(jnp.asarray, random_batch(rng)))
    history.append(state)
  assert not changed(history[0].policy.params, history[2].policy.params)
  assert int(history[2].policy.step) == 0
  assert changed(history[0].value.params, history[2].value.params)  # step 0 has lr 0 (warm-up)
  # Released: the policy's own schedule starts (its first step has learning rate 0).
  assert int(history[4].policy.step) == 2
  assert changed(history[2].policy.params, history[4].policy.params)


def _policy_setup(objective, grad_accum_steps=1):
  model = Transformer(CFG)
  tx = make_optimizer(OPT, 40)
  init_fn = lambda rng: TrainState.create(init_params(model, rng), tx)
  return init_fn, policy_step.make_policy_step(model, tx, objective, grad_accum_steps)


def _value_setup(objective):
  policy, value = Transformer(CFG), Transformer(CFG, head="value")
  tx = make_optimizer(OPT, 40)
  init_fn = lambda rng: DQOState(
      policy=TrainState.create(init_params(policy, rng), tx),
      value=TrainState.create(init_params(value, rng), tx),
  )
  return init_fn, make_policy_value_step(policy, value, tx, tx, objective)


def _method_batch(method):
  rng = np.random.default_rng(7)
  batch = random_batch(rng)
  if method == "kto":
    batch["correct"] = np.concatenate([np.ones(8), np.zeros(8)]).astype(np.float32)
  if method == "dqo_ps":
    phi = rng.uniform(0, 1, batch["response"].shape).astype(np.float32)
    batch["potentials"] = phi
    batch["boundary_mask"] = (rng.uniform(size=phi.shape) < 0.3).astype(np.float32)
  return batch


PS = dataclasses.replace(
    DQO,
    process=dqo.Process(
        alpha=1.0, value_weight=1.0, value_decay_steps=20, correct=1.0, incorrect=0.0
    ),
)

METHOD_STEPS = {
    "sft": lambda: _policy_setup(policy_step.nll_objective),
    "dpo": lambda: _policy_setup(dpo.objective(0.5)),
    "kto": lambda: _policy_setup(kto.objective(0.5, 1.0, 1.0)),
    "dro": lambda: _value_setup(dro.objective(0.5)),
    "dqo": lambda: _value_setup(dqo.objective(DQO)),
    "dqo_ps": lambda: _value_setup(dqo.objective(PS)),
}


@pytest.mark.parametrize("method", sorted(METHOD_STEPS))
def test_every_method_lowers_its_loss_on_a_fixed_batch(method):
  """A few steps on one batch: each method's own objective falls (RFT shares SFT's step)."""
  init_fn, step_fn = METHOD_STEPS[method]()
  _, metrics = _run(init_fn, step_fn, (1, 1, 1), [_method_batch(method)] * 25)
  key = "loss" if "loss" in metrics[0] else "policy_loss"
  first, last = metrics[0][key], metrics[-1][key]
  assert np.isfinite(last) and last < 0.95 * first, (method, first, last)
