"""RLOO, the method added through the registry alone (dqo_jax/methods/rloo.py): its loss against a
float64 reference, its stationary point on a problem small enough to enumerate, its batches, its
config checks, and a run of the pipeline with `--config.method=rloo`."""

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.arith import get_config
from dqo_jax import methods
from dqo_jax.errors import UserError
from dqo_jax.main import check_config
from dqo_jax.methods import rloo
from dqo_jax.data.offline import offline_arrays

from tiny_run import ROOT, command


def _reference(logratio, reward, beta, k):
  """Plain-Python float64: advantages, loss, and d loss / d logratio (advantages stopped)."""
  n = len(logratio)
  g = n // k
  shaped = [float(reward[i]) - beta * float(logratio[i]) for i in range(n)]
  adv = []
  for i in range(n):
    group = [j for j in range(n) if j % g == i % g]  # row k * G + g is sample k of prompt g
    others = [shaped[j] for j in group if j != i]
    adv.append(shaped[i] - sum(others) / len(others))
  loss = -sum(a * float(l) for a, l in zip(adv, logratio)) / n
  return np.array(adv), loss, -np.array(adv) / n


@pytest.mark.parametrize("k", [2, 4])
def test_loss_matches_a_float64_reference(x64, k):
  rng = np.random.default_rng(k)
  logratio = rng.normal(size=3 * k)
  reward = rng.integers(0, 2, 3 * k).astype(np.float64)
  adv, loss, grad = _reference(logratio, reward, 0.3, k)
  fn = lambda l: rloo.rloo_loss(l, jnp.asarray(reward), beta=0.3, group_size=k)
  (got_loss, got_adv), got_grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logratio))
  jitted = jax.jit(fn)(jnp.asarray(logratio))[0]
  np.testing.assert_allclose(got_adv, adv, rtol=1e-12)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-12)
  np.testing.assert_allclose(jitted, loss, rtol=1e-12)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-12)


def test_loss_refuses_batches_that_are_not_whole_groups():
  with pytest.raises(ValueError, match="groups of 4"):
    rloo.rloo_loss(jnp.zeros(6), jnp.zeros(6), beta=0.1, group_size=4)
  with pytest.raises(ValueError, match="groups of 1"):
    rloo.rloo_loss(jnp.zeros(6), jnp.zeros(6), beta=0.1, group_size=1)


def _tabular_optimum(beta, sign=1.0, steps=300):
  """A softmax policy over 5 responses for each of 3 prompts, trained on fixed groups of K = 4
  samples of pi_ref with the RLOO objective; returns TV(pi_theta, pi*) and TV(pi_ref, pi*)
  averaged over prompts, pi*(y) ∝ pi_ref(y) exp(R(y) / beta) computed exactly."""
  rng = np.random.default_rng(0)
  prompts, responses, k, groups = 3, 5, 4, 300
  ref_logits = rng.normal(size=(prompts, responses))
  ref = np.exp(ref_logits) / np.exp(ref_logits).sum(1, keepdims=True)
  reward = rng.integers(0, 2, (prompts, responses)).astype(np.float64)
  reward[:, 0], reward[:, 1] = 1.0, 0.0  # every prompt has a correct and an incorrect response
  star = ref * np.exp(reward / beta)
  star /= star.sum(1, keepdims=True)
  # [K, prompts * groups]: sample k of group g of prompt p at [k, p * groups + g]
  prompt = np.repeat(np.arange(prompts), groups)
  y = np.stack([[rng.choice(responses, p=ref[p]) for p in prompt] for _ in range(k)])
  prompt, y = np.broadcast_to(prompt, y.shape).reshape(-1), y.reshape(-1)
  r = reward[prompt, y]
  log_ref = np.log(ref)[prompt, y]

  def loss(theta):
    logp = jax.nn.log_softmax(theta)[prompt, y]
    return rloo.rloo_loss(logp - log_ref, r, beta=sign * beta, group_size=k)[0]

  grad = jax.jit(jax.grad(loss))
  theta = jnp.asarray(ref_logits)
  for _ in range(steps):
    theta = theta - 20.0 * grad(theta)
  pi = np.asarray(jax.nn.softmax(theta))
  tv = lambda a, b: 0.5 * np.abs(a - b).sum(1).mean()
  return tv(pi, star), tv(ref, star)


def test_its_stationary_point_is_the_kl_regularised_optimum():
  """Each group's advantages sum to zero, so the softmax's normaliser drops out of the gradient
  and every response's component is zero exactly when R - beta l is the same for all: at pi*,
  whatever the sampled frequencies, as long as every response was sampled."""
  tv, tv_ref = _tabular_optimum(beta=0.5)
  assert tv_ref > 0.2
  assert tv < 1e-3, tv
  # With the KL term's sign flipped the point is a repeller: the same descent diverges (NaN).
  flipped, _ = _tabular_optimum(beta=0.5, sign=-1.0)
  assert not flipped < 0.1, flipped


def _records(prompts=6, k=4):
  rng = np.random.default_rng(1)
  out = []
  for p in range(prompts):
    for _ in range(k):
      n = int(rng.integers(1, 5))
      out.append(
          dict(
              prompt_index=p,
              prompt=[1, 2 + p],
              response=rng.integers(3, 9, n).tolist(),
              behaviour_logprobs=[-1.0] * n,
              ref_logprobs=[-1.0] * n,
              reward=float(rng.integers(0, 2)),
              correct=False,
              finish="eos",
          )
      )
  return out


def test_batches_hold_whole_prompts_laid_out_sample_major():
  config = get_config("tiny")
  config.method, config.sample.samples_per_prompt, config.train.batch_size = "rloo", 4, 8
  records = _records()
  arrays = offline_arrays(records, config.data, pad_id=0)
  data = methods.TrainData(
      config=config,
      gold=None,
      known=None,
      read_samples=lambda: (records, arrays),
      reference_logprobs=None,
      read_potentials=None,
  )
  view = rloo.view(data)
  assert view.size == 24 and view.describe == dict(prompts=6, samples_per_prompt=4)
  for step in range(6):
    batch = view.batch_at(step)
    prompts = batch["prompt"][:, -1].reshape(4, 2)  # [K, G]
    assert (prompts == prompts[0]).all() and prompts[0, 0] != prompts[0, 1]
  records[3]["prompt_index"] = 1  # prompt 0 now has 3 samples, prompt 1 has 5
  data.__dict__.pop("samples")
  with pytest.raises(UserError, match="--redo=sample"):
    rloo.view(data)


@pytest.mark.parametrize(
    "k, batch, message",
    [(1, 8, "at least 2 samples per prompt"), (3, 8, "use a multiple of 3")],
)
def test_config_checks(k, batch, message):
  config = get_config("tiny")
  config.method, config.sample.samples_per_prompt, config.train.batch_size = "rloo", k, batch
  with pytest.raises(UserError, match=message):
    check_config(config)


def test_the_pipeline_trains_and_evaluates_it(tmp_path):
  proc = subprocess.run(
      command(tmp_path, "--config.method=rloo", "--config.stages=sft,sample,train,eval"),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  done = json.loads((tmp_path / "rloo" / "DONE.json").read_text())
  assert done["summary"]["method"] == "rloo" and done["summary"]["samples_per_prompt"] == 2
  assert set(json.loads((tmp_path / "results.json").read_text())) == {"sft", "rloo"}
