"""The DQO and DRO steps reach the KL-regularised optimum on a problem small enough to enumerate.

Every response to every prompt is listed, so pi*(y|x) = pi_ref(y|x) exp(R(x, y)/beta) / Z(x)
(docs/method.md, "The parameterisation") is computed exactly and compared, in total variation,
with the trained policy's exact distribution. The project's own train steps learn offline from
samples of pi_ref, as the pipeline's `train` stage does.

Why the threshold is what it is. At pi* the soft return along every path is deterministic
(G_t = V*(s_t)), so sampling noise leaves the optimum a zero of both losses: the data cannot pull
the policy away from it. What the data cannot do is pin the policy on a (state, action) pair it
never visits: any probability there is as good for the loss. So the floor is the pi*-mass of the
responses that no sample covers (`_unseen_mass`, about 0.015 to 0.02 here), and the threshold is
that floor plus a tolerance for the residual of finitely many Adam steps (0.035: DQO ends about
0.01 above the floor after STEPS steps and reaches it with twice as many), far below pi_ref's own
distance (about 0.3).

`python -m tests.test_convergence kl_sign` (or `q_index`) trains DQO with a defect injected: the
KL sign of the soft reward flipped, or G_t in place of G_{t+1} in the Q target. Each ends above
the threshold, so this test catches them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.arith import get_config
from dqo_jax.model import ModelConfig, Transformer, value_params_from_policy
from dqo_jax.train.forward import response_logprobs
from dqo_jax.train.policy_step import make_sft_step
from dqo_jax.methods import dqo, dro
from dqo_jax.methods.dqo import make_dqo_step
from dqo_jax.train.policy_value_step import PolicyValueState, make_policy_value_step
from dqo_jax.train.state import TrainState, make_optimizer

EOS = 0  # also the padding token: masks come from lengths
DIGITS = (1, 2, 3)
MAX_RESPONSE = 4  # up to 3 digits then EOS, or 4 digits cut at the limit (unparseable, R = 0)
PROMPTS = ((2,), (1, 3), (3, 1, 2))  # different lengths: left padding is exercised
BETA = 0.5
SAMPLES_PER_PROMPT = 1000
STEPS = 2500
# The residual of a finite run (steps x lr below), added to the sampling floor.
OPTIMISATION_TOLERANCE = 0.035
CFG = ModelConfig(
    vocab_size=4, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
)


def _responses():
  """Every response: (tokens [R] right-padded with EOS, length)."""
  out = []
  for k in range(MAX_RESPONSE):
    for digits in itertools.product(DIGITS, repeat=k):
      out.append((list(digits) + [EOS], k + 1))
  for digits in itertools.product(DIGITS, repeat=MAX_RESPONSE):
    out.append((list(digits), MAX_RESPONSE))
  tokens = np.array([t + [EOS] * (MAX_RESPONSE - len(t)) for t, _ in out], np.int32)
  return tokens, np.array([n for _, n in out], np.int32)


def _reward(prompt, tokens, length) -> float:
  """1 when the response ends with EOS and (prompt digits + response digits) is 0 mod 3: the
  outcome depends on every token."""
  if tokens[length - 1] != EOS:
    return 0.0
  return float((sum(prompt) + sum(tokens[: length - 1])) % 3 == 0)


@functools.cache
def _problem():
  """(batch of every (prompt, response), rewards [P, N]) with prompts left-padded."""
  tokens, lengths = _responses()
  n, width = len(tokens), max(map(len, PROMPTS))
  prompt = np.zeros((len(PROMPTS) * n, width), np.int32)
  prompt_mask = np.zeros_like(prompt)
  for i, p in enumerate(PROMPTS):
    prompt[i * n : (i + 1) * n, width - len(p) :] = p
    prompt_mask[i * n : (i + 1) * n, width - len(p) :] = 1
  rewards = np.array([[_reward(p, t, l) for t, l in zip(tokens, lengths)] for p in PROMPTS])
  batch = dict(
      prompt=prompt,
      prompt_mask=prompt_mask,
      response=np.tile(tokens, (len(PROMPTS), 1)),
      response_len=np.tile(lengths, len(PROMPTS)),
  )
  return batch, rewards


def _sequence_logprobs(model, params, batch) -> np.ndarray:
  """log pi(y|x) of every enumerated response, [P, N] float64."""
  logp = np.asarray(response_logprobs(model, params, batch), np.float64)
  mask = np.arange(MAX_RESPONSE)[None] < batch["response_len"][:, None]
  return (logp * mask).sum(1).reshape(len(PROMPTS), -1)


def _optimum(ref_seq_logp, rewards, beta):
  """pi*(y|x) proportional to pi_ref(y|x) exp(R/beta), [P, N]."""
  logits = ref_seq_logp + rewards / beta
  return np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))


def _tv(p, q) -> float:
  """Total variation distance, averaged over prompts."""
  return float(np.mean(0.5 * np.abs(p - q).sum(1)))


def _opt(lr, steps):
  # Decayed almost to zero, so that the end of the run averages out minibatch noise.
  return make_optimizer(
      ml_collections.ConfigDict(
          dict(
              lr=lr, warmup_steps=20, end_lr_fraction=0.01, weight_decay=0.0, grad_clip=1.0, b2=0.98
          )
      ),
      steps,
  )


@functools.cache
def _reference():
  """pi_ref: the tiny Transformer trained by the SFT step on a random tabular policy's samples,
  so that it is state-dependent and far from uniform. Returns (model, params, [P, N] log pi_ref)."""
  batch, _ = _problem()
  model = Transformer(CFG)
  params = nn.meta.unbox(
      model.init(jax.random.key(0), batch["prompt"][:1], batch["prompt_mask"][:1])["params"]
  )
  rng = np.random.default_rng(0)
  tokens, lengths = _responses()
  # A random target distribution over responses, per prompt (Dirichlet: far from uniform).
  target = rng.dirichlet(np.full(len(tokens), 0.3), size=len(PROMPTS))
  tx = _opt(3e-3, 300)
  state = TrainState.create(params, tx)
  step = jax.jit(make_sft_step(model, tx))
  n = len(tokens)
  for _ in range(300):
    rows = np.concatenate([i * n + rng.choice(n, 32, p=target[i]) for i in range(len(PROMPTS))])
    state, _ = step(state, {k: v[rows] for k, v in batch.items()})
  return model, state.params, _sequence_logprobs(model, state.params, batch)


@functools.cache
def _dataset():
  """SAMPLES_PER_PROMPT responses per prompt drawn from pi_ref (exactly, from the enumeration),
  laid out as the sample stage writes them: reference and behaviour log-probs per token."""
  batch, rewards = _problem()
  model, params, ref_seq = _reference()
  ref_tok = np.asarray(response_logprobs(model, params, batch), np.float32)
  rng = np.random.default_rng(1)
  n = rewards.shape[1]
  rows = np.concatenate(
      [
          i * n + rng.choice(n, SAMPLES_PER_PROMPT, p=np.exp(ref_seq[i]) / np.exp(ref_seq[i]).sum())
          for i in range(len(PROMPTS))
      ]
  )
  data = {k: v[rows] for k, v in batch.items()}
  data.update(
      reward=rewards.reshape(-1)[rows].astype(np.float32),
      ref_logprobs=ref_tok[rows],
      behaviour_logprobs=ref_tok[rows],
  )
  seen = np.zeros(rewards.shape, bool)
  seen.reshape(-1)[rows] = True
  return data, seen


def _unseen_mass(target) -> float:
  """The mass `target` [P, N] puts on responses no sample covers, averaged over prompts."""
  _, seen = _dataset()
  return float(np.mean((target * ~seen).sum(1)))


def _train(step_fn, state, steps, batch_size=128):
  data, _ = _dataset()
  rng = np.random.default_rng(2)
  step = jax.jit(step_fn)
  size = len(data["reward"])
  for _ in range(steps):
    rows = rng.choice(size, batch_size, replace=False)
    state, metrics = step(state, {k: v[rows] for k, v in data.items()})
  assert float(metrics["skipped_updates"]) == 0.0
  return state


def _policy_value_state(policy_tx, value_tx):
  model, params, _ = _reference()
  value_model = Transformer(CFG, head="value")
  batch, _ = _problem()
  value_init = nn.meta.unbox(
      value_model.init(jax.random.key(1), batch["prompt"][:1], batch["prompt_mask"][:1])["params"]
  )
  state = PolicyValueState(
      policy=TrainState.create(params, policy_tx),
      value=TrainState.create(value_params_from_policy(params, value_init), value_tx),
  )
  return model, value_model, state


def _distance_after(make_step, steps):
  """TV(pi_theta, pi*) after training, with pi_ref's distance and the sampling floor."""
  batch, rewards = _problem()
  _, _, ref_seq = _reference()
  target = _optimum(ref_seq, rewards, BETA)
  policy_tx, value_tx = _opt(3e-3, steps), _opt(3e-3, steps)
  model, value_model, state = _policy_value_state(policy_tx, value_tx)
  step_fn = make_step(model, value_model, policy_tx, value_tx)
  state = _train(step_fn, state, steps)
  trained = np.exp(_sequence_logprobs(model, state.policy.params, batch))
  return _tv(trained, target), _tv(np.exp(ref_seq), target), _unseen_mass(target)


# The `dqo` settings as the configs ship them (lambda, normalisation, no importance traces), at
# BETA.
DQO_CFG = dataclasses.replace(dqo.Settings.from_config(get_config()), beta=BETA)


def test_dqo_reaches_the_optimum():
  make = lambda p, v, ptx, vtx: make_dqo_step(p, v, ptx, vtx, DQO_CFG)
  tv, tv_ref, floor = _distance_after(make, STEPS)
  print(f"DQO: TV(pi_theta, pi*) {tv:.4f}, TV(pi_ref, pi*) {tv_ref:.4f}, floor {floor:.4f}")
  assert tv_ref > 0.2
  assert tv < floor + OPTIMISATION_TOLERANCE


def test_dro_reaches_the_sequence_level_optimum():
  make = lambda p, v, ptx, vtx: make_policy_value_step(p, v, ptx, vtx, dro.objective(BETA))
  tv, tv_ref, floor = _distance_after(make, STEPS)
  print(f"DRO: TV(pi_theta, pi*) {tv:.4f}, TV(pi_ref, pi*) {tv_ref:.4f}, floor {floor:.4f}")
  assert tv < floor + OPTIMISATION_TOLERANCE


def _inject(defect: str) -> None:
  """Breaks `dqo_jax.losses` in place, for the defect runs of the module docstring."""
  from dqo_jax import losses  # pylint: disable=g-import-not-at-top

  returns, q_targets = losses.soft_lambda_returns, losses.q_targets
  if defect == "kl_sign":
    # Swapping pi and pi_ref turns rt~_t = r_t - beta l_t into r_t + beta l_t.
    losses.soft_lambda_returns = lambda r, v, lp, ref, m, **kw: returns(r, v, ref, lp, m, **kw)
  elif defect == "q_index":
    # y_t with lam G_t where lam G_{t+1} belongs.
    def shifted(rewards, values, g, mask, *, lam):
      g = jnp.where(mask > 0, g, 0.0)
      return q_targets(rewards, values, g, mask, lam=lam) + lam * (g - losses.next_values(g, mask))

    losses.q_targets = shifted
  else:
    raise SystemExit(f"unknown defect {defect!r}: kl_sign or q_index")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top

  _inject(sys.argv[1])
  got, ref, floor = _distance_after(lambda *a: make_dqo_step(*a, DQO_CFG), STEPS)
  limit = floor + OPTIMISATION_TOLERANCE
  print(
      f"{sys.argv[1]}: TV(pi_theta, pi*) {got:.4f}, TV(pi_ref, pi*) {ref:.4f}, threshold {limit:.4f}"
  )
  print("caught: above the threshold" if got >= limit else "NOT caught: below the threshold")
