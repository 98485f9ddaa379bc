"""Train steps that update the policy alone (SFT, RFT, DPO, KTO, RLOO; `dqo_jax.methods`).

`make_policy_step(model, tx, objective)` differentiates `objective(logp, batch)`, where `logp` is
log pi_theta(a_t|s_t) for every response token of the batch, [B, R]; each method's objective
says how it lays out its batch.
"""

from __future__ import annotations

import jax
import optax

from dqo_jax import bandit_losses, lora
from dqo_jax.losses import sequence_nll
from dqo_jax.model import Transformer
from dqo_jax.train import accumulate
from dqo_jax.train.forward import response_logprobs, response_mask, with_dropout_keys
from dqo_jax.train.state import TrainState, keep_if_finite


def make_policy_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    objective,
    grad_accum_steps: int = 1,
    accum_key: str = "config.train.grad_accum_steps",
    dropout_key=None,
):
  """(state, batch) -> (state, metrics); objective(logp [B, R], batch) -> (loss, metrics).

  The model runs on `grad_accum_steps` micro-batches (`dqo_jax.train.accumulate`); the objective
  always sees the whole batch. `accum_key` names the setting in error messages. A step whose
  loss or gradient is not finite leaves the state as it was (skipped_updates 1). With LoRA the
  state's parameters are the adapters and `base` the frozen rest (`dqo_jax.lora`), and
  `dropout_key` draws the adapters' dropout masks (`model.lora.dropout`).
  """

  def step(state: TrainState, batch, base=None):
    logprobs = lambda p, b: response_logprobs(model, lora.merge(base, p), b)
    rows = with_dropout_keys(batch, dropout_key, state.step)
    logp, pullback = accumulate.vjp(logprobs, state.params, rows, grad_accum_steps, accum_key)
    (loss, metrics), d_logp = jax.value_and_grad(objective, has_aux=True)(logp, batch)
    (grads,) = pullback(d_logp)
    grad_norm = optax.tree.norm(grads)
    new, skipped = keep_if_finite(state, state.apply_gradients(grads, tx), loss, grad_norm)
    return new, dict(loss=loss, grad_norm=grad_norm, **metrics, skipped_updates=skipped)

  return step


def nll_objective(logp, batch):
  """SFT and RFT: negative log-likelihood of the response tokens."""
  return sequence_nll(logp, response_mask(batch)), {}


def halves(x):
  """A batch of two halves laid out [first P | second P] (pairs): the two halves."""
  n = x.shape[0] // 2
  return x[:n], x[n:]


def sequence_logratio(logp, batch):
  """log pi(y|x) - log pi_ref(y|x) of each response [B], from logp [B, R] and the batch's."""
  return bandit_losses.sequence_logratio(logp, batch["ref_logprobs"], response_mask(batch))


def make_sft_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    grad_accum_steps: int = 1,
    dropout_key=None,
):
  return make_policy_step(
      model, tx, nll_objective, grad_accum_steps, "config.sft.grad_accum_steps", dropout_key
  )
