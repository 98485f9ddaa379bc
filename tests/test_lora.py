"""LoRA adapters (`config.model.lora`, dqo_jax/lora.py): an adapted model starts equal to its
base; folded adapters give the adapted forward; every method's step trains the adapters (and a
value head) alone, over a base passed in and never changed; an adapter run resumes bit for bit
from checkpoints that hold the adapters alone. The pipeline with adapters: test_lora_pipeline.py."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.arith import get_config
from dqo_jax import lora, methods, sharding
from dqo_jax.errors import UserError
from dqo_jax.model import ModelConfig, policy_trunk
from dqo_jax.train import build
from dqo_jax.train.forward import response_logprobs, response_values
from dqo_jax.train.loop import fit
from helpers import random_batch, saved_arrays

RANK = 4
VOCAB = 32


def _config(method="dqo", rank=RANK, **lora_cfg):
  c = get_config("tiny")
  c.method = method
  c.model.lora.update(rank=rank, **lora_cfg)
  c.data.update(max_prompt_len=6, max_response_len=7)
  c.train.update(batch_size=8, steps=6)
  return c


def _setup(config, devices=1):
  model_cfg = ModelConfig.from_config(config.model, VOCAB)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  step = build.build_train_step(config, model_cfg, mesh)
  base = nn.meta.unbox(build.boxed_init(step.policy_model, jax.random.key(1)))
  return step, base


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _randomised(params, rng):
  """Adapters with B no longer zero, as after training."""
  return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype), params)


def _models(config):
  policy, value = build.models(config, ModelConfig.from_config(config.model, VOCAB))
  return policy, value, build.adapted(config, policy), build.adapted(config, value)


def _batch(seed=0, b=4):
  return jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(seed), b=b))


def test_an_adapted_model_starts_equal_to_its_base():
  step, base = _setup(_config())
  state = nn.meta.unbox(step.init_fn(jax.random.key(2), base))
  policy, value, adapted_policy, adapted_value = _models(step.config)
  batch = _batch()
  got = response_logprobs(adapted_policy, lora.merge(base, state.policy.params), batch)
  np.testing.assert_array_equal(got, response_logprobs(policy, base, batch))
  # A head that is not zero, so that the values say something about the trunk.
  head = 0.5 * jax.random.normal(jax.random.key(3), state.value.params["value_head"].shape)
  value_params = lora.merge(policy_trunk(base), {**state.value.params, "value_head": head})
  got = response_values(adapted_value, value_params, batch)
  np.testing.assert_array_equal(got, response_values(value, lora.split(value_params)[0], batch))
  assert np.abs(np.asarray(got)).max() > 0


@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "q,v"])
def test_folded_adapters_give_the_adapted_forward(targets):
  step, base = _setup(_config(targets=targets))
  state = nn.meta.unbox(step.init_fn(jax.random.key(2), base))
  adapters = _randomised(state.policy.params, np.random.default_rng(0))
  policy, _, adapted_policy, _ = _models(step.config)
  batch = _batch()
  merged = lora.merge(base, adapters)
  unfolded = response_logprobs(adapted_policy, merged, batch)
  folded = response_logprobs(policy, lora.fold(merged, step.config.model.lora), batch)
  np.testing.assert_allclose(folded, unfolded, atol=1e-5, rtol=0)
  # and the adapters matter: the folded model is not the base
  assert np.abs(np.asarray(folded - response_logprobs(policy, base, batch))).max() > 1e-3
  adapted = {k.rsplit("/", 2)[-2] for k in _flat(adapters)}
  assert adapted == set(targets.split(","))


def _full_width_batch(step, seed):
  """Random data in the layout the method's step is compiled for."""
  rng = np.random.default_rng(seed)
  shapes = step.abstract_batch
  out = {}
  for k, s in shapes.items():
    if k == "response_len":
      out[k] = rng.integers(1, shapes["response"].shape[1] + 1, s.shape).astype(s.dtype)
    elif k == "prompt_mask":
      out[k] = np.ones(s.shape, s.dtype)
    elif k in ("prompt", "response"):
      out[k] = rng.integers(4, VOCAB, s.shape).astype(s.dtype)
    elif np.issubdtype(s.dtype, np.floating):
      out[k] = -rng.uniform(0, 2, s.shape).astype(s.dtype)
    else:
      out[k] = rng.integers(0, 2, s.shape).astype(s.dtype)
  return out


@pytest.mark.parametrize("label", list(methods.compare_labels()))
def test_every_method_trains_the_adapters_alone(label):
  config = _config()
  for key, value in methods.compare_labels()[label].items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  step, base = _setup(config)
  state = nn.meta.unbox(step.init_fn(jax.random.key(2), base))
  trained = {**_flat(build.policy_of(state))}
  if hasattr(state, "value"):
    trained.update({f"value/{k}": v for k, v in _flat(state.value.params).items()})
  assert trained and all(k.endswith(("_lora_a", "_lora_b", "value_head")) for k in trained)
  starts_at_zero = [k for k in trained if k.endswith(("_lora_b", "value_head"))]
  assert all(not trained[k].any() for k in starts_at_zero)
  base_before = jax.tree.map(np.asarray, base)
  step_fn = jax.jit(step.step_fn)
  # Three steps: the first has a zero learning rate (warm-up), and the value adapters' gradient
  # is zero until the value head, which starts at zero, has moved once.
  for i in range(3):
    state, metrics = step_fn(state, jax.tree.map(jnp.asarray, _full_width_batch(step, i)), base)
  assert float(metrics["skipped_updates"]) == 0
  assert all(np.isfinite(float(v)) for v in metrics.values())
  jax.tree.map(np.testing.assert_array_equal, base, base_before)
  # Every B (and the value head) has moved: gradients reach both models' adapters.
  after = {**_flat(build.policy_of(state))}
  if hasattr(state, "value"):
    after.update({f"value/{k}": v for k, v in _flat(state.value.params).items()})
  assert [k for k in starts_at_zero if not after[k].any()] == []
  # The trained policy differs from the base only in the targeted kernels, by rank <= RANK.
  policy = _flat(step.policy_params(state, base))
  plain = _flat(base)
  assert policy.keys() == plain.keys()
  changed = [k for k in plain if not np.array_equal(policy[k], plain[k])]
  assert changed and all(k.rsplit("/", 2)[-2] in lora.TARGETS for k in changed)
  for k in changed:
    delta = (policy[k] - plain[k]).astype(np.float64)
    matrix = (
        delta.reshape(-1, delta.shape[-1])
        if k.endswith("o/kernel")
        else delta.reshape(delta.shape[0], -1)
    )
    assert np.linalg.matrix_rank(matrix, tol=1e-6) <= RANK


def _fit(workdir, step, base, steps):
  return fit(
      stage_dir=str(workdir),
      init_fn=step.init_fn,
      step_fn=step.step_fn,
      batch_at=lambda i: _full_width_batch(step, i),
      num_steps=steps,
      mesh=step.mesh,
      rules=sharding.logical_rules(step.config.mesh),
      rng=jax.random.key(0),
      checkpoint_cfg=ml_collections.ConfigDict(dict(every=2, keep=5)),
      max_nonfinite=10,
      log_every=2,
      desc="lora",
      init_args=(base,),
      base=base,
      base_shardings=step.base_shardings,
  )


def test_an_adapter_run_resumes_bit_for_bit_from_checkpoints_of_the_adapters_alone(tmp_path):
  """Over two devices (the batch split in two): six steps straight, and three steps then a
  restart that resumes at step 3, end equal; the checkpoints hold no base weight. (With QLoRA
  and dropout: tests/test_preemption.py, killed with SIGKILL.)"""
  step, base = _setup(_config(), devices=2)
  base = step.base_of(jax.device_put(base, step.plain_shardings))
  straight, _ = _fit(tmp_path / "straight", step, base, 6)
  _fit(tmp_path / "resumed", step, base, 3)
  resumed, summary = _fit(tmp_path / "resumed", step, base, 6)
  assert summary["resumed_from"] == 3
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # What Orbax wrote: adapters, the value head and their optimizer moments; steps and counts.
  arrays = saved_arrays(tmp_path / "resumed" / "checkpoints")
  assert arrays and all(k[-1].endswith(("_lora_a", "_lora_b", "value_head")) for k in arrays)


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_a_quantized_base_is_stored_quantized_and_read_as_its_dequantized_weights(qtype):
  """QLoRA (`base_qtype`): the targeted kernels are held in `qtype`, everything else as it was;
  the adapted model over them starts equal to the plain model over the dequantized base, and
  folding trained adapters into that base gives the adapted forward."""
  config = _config(base_qtype=qtype, base_tile_size=8 if qtype == "nf4" else 0)
  step, base = _setup(config)
  quantized = step.base_of(base)
  flat, plain = flax.traverse_util.flatten_dict(quantized), flax.traverse_util.flatten_dict(base)
  assert flat.keys() == plain.keys()
  kernels = [k for k in flat if k[-1] == "kernel" and k[-2] in lora.TARGETS]
  assert len(kernels) == len(lora.TARGETS) * config.model.n_layers
  stored = {k: v.array.qvalue.dtype for k, v in flat.items() if k in kernels}
  assert set(map(str, stored.values())) == {"int8" if qtype == "int8" else "uint4"}, stored
  for k in plain.keys() - set(kernels):
    np.testing.assert_array_equal(flat[k], plain[k])
  dequantized = lora.dequantize(quantized)
  read = flax.traverse_util.flatten_dict(dequantized)
  error = max(float(jnp.abs(read[k] - plain[k]).max()) for k in kernels)
  assert 0 < error < (0.02 if qtype == "int8" else 0.2)
  state = nn.meta.unbox(step.init_fn(jax.random.key(2), None))
  policy, _, adapted_policy, _ = _models(config)
  batch = _batch()
  got = response_logprobs(adapted_policy, lora.merge(quantized, state.policy.params), batch)
  want = response_logprobs(policy, dequantized, batch)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  adapters = _randomised(state.policy.params, np.random.default_rng(0))
  unfolded = response_logprobs(adapted_policy, lora.merge(quantized, adapters), batch)
  trained = state.replace(policy=state.policy.replace(params=adapters))
  folded = response_logprobs(policy, step.policy_params(trained, quantized), batch)
  np.testing.assert_allclose(folded, unfolded, atol=1e-5, rtol=0)


def test_adapter_dropout_draws_its_masks_from_the_step():
  """`dropout`: a training step's adapted forward depends on its masks (two steps of one state
  differ, the same step repeats exactly); with B still zero it is the base whatever the masks."""
  config = _config(method="rft", dropout=0.5)
  step, base = _setup(config)
  state = nn.meta.unbox(step.init_fn(jax.random.key(2), base))
  state = state.replace(params=_randomised(state.params, np.random.default_rng(0)))
  batch = jax.tree.map(jnp.asarray, _full_width_batch(step, 0))
  step_fn = jax.jit(step.step_fn)
  loss = lambda s: float(step_fn(s, batch, base)[1]["loss"])
  at_one = state.replace(step=state.step + 1)
  assert loss(state) == loss(state) and loss(state) != loss(at_one)
  no_dropout = _config(method="rft")
  plain_step, _ = _setup(no_dropout)
  assert loss(state) != float(jax.jit(plain_step.step_fn)(state, batch, base)[1]["loss"])
  # Fresh adapters (B = 0) add nothing, dropped or not.
  fresh = nn.meta.unbox(step.init_fn(jax.random.key(2), base))
  np.testing.assert_allclose(
      float(step_fn(fresh, batch, base)[1]["loss"]),
      float(jax.jit(plain_step.step_fn)(fresh, batch, base)[1]["loss"]),
      rtol=1e-6,
  )


def test_tiles_that_do_not_divide_a_projection_are_refused_in_one_line():
  with pytest.raises(UserError, match=r"base_tile_size=64 does not divide .* q \(32\)"):
    _setup(_config(base_qtype="nf4", base_tile_size=64))
