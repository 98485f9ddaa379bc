"""Supervised fine-tuning on gold solutions: NLL on response tokens only."""

from __future__ import annotations

import jax
import optax

from dqo_jax.losses import sequence_nll
from dqo_jax.model import Transformer
from dqo_jax.train.forward import response_logprobs, response_mask
from dqo_jax.train.state import TrainState


def make_sft_step(model: Transformer, tx: optax.GradientTransformation):
  def step(state: TrainState, batch):
    mask = response_mask(batch)
    loss_fn = lambda p: sequence_nll(response_logprobs(model, p, batch), mask)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads))
    return state.apply_gradients(grads, tx), metrics

  return step
