"""What the checkpoint digest (dqo_jax/checkpoint.py) costs: saving and restoring the DQO state of
the embedded model (configs/arith.py: policy and value in float32 and their AdamW moments) with
the digest against Orbax alone, the digest by itself, and, for scale, host hashes of the same
bytes.

    python -m benchmarks.checkpoint_digest [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from benchmarks.run import markdown
from benchmarks.timing import interleaved, median_ratio, row
from benchmarks.train_steps import OPT
from dqo_jax.checkpoint import Checkpoints, state_digest
from dqo_jax.model import ModelConfig, Transformer, value_params_from_policy
from dqo_jax.train.policy_value_step import PolicyValueState
from dqo_jax.train.state import TrainState, make_optimizer


def dqo_state(vocab_size: int = 256):
  """The DQO train state of configs/arith.py's model (ModelConfig's defaults, vocabulary 256)."""
  cfg = ModelConfig(vocab_size=vocab_size)
  policy, value = Transformer(cfg, head="lm"), Transformer(cfg, head="value")
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = lambda m, seed: nn.meta.unbox(m.init(jax.random.key(seed), tokens, tokens + 1)["params"])
  policy_params = init(policy, 0)
  value_params = value_params_from_policy(policy_params, init(value, 1))
  tx = make_optimizer(OPT, 1000)
  state = PolicyValueState(
      policy=TrainState.create(policy_params, tx), value=TrainState.create(value_params, tx)
  )
  # Moments as after some training: random, not the zeros a fresh optimizer starts from.
  leaves, tree = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  leaves = [
      jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)) if x.dtype == jnp.float32 else x
      for x in leaves
  ]
  return jax.tree.unflatten(tree, leaves)


class _Saves:
  """Saves of `state` to fresh steps, each waited for: with the digest, or by Orbax alone."""

  def __init__(self, state, directory: str, digest: bool):
    self.state, self.step = state, 0
    if digest:
      self.ckpt = Checkpoints(directory, every=1, keep=1)
      self.manager = self.ckpt.manager
      self.save = lambda step: self.ckpt.save(step, self.state)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True)
      self.manager = ocp.CheckpointManager(directory, options=options)
      self.save = lambda step: self.manager.save(step, args=ocp.args.StandardSave(self.state))

  def __call__(self):
    self.step += 1
    self.save(self.step)
    self.manager.wait_until_finished()


def rows(quick: bool) -> list[dict]:
  state = dqo_state()
  leaves = jax.tree.leaves(state)
  n_bytes = sum(x.nbytes for x in leaves)
  n_params = sum(x.size for x in jax.tree.leaves(state.policy.params))
  repeats = 5 if quick else 11
  what = f"DQO state of the embedded model ({n_params / 1e6:.2f}M parameters x 2 models, "
  what += f"AdamW moments): {n_bytes / 2**20:.1f} MiB"
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    saves = {
        "digest": _Saves(state, f"{tmp}/digest", digest=True),
        "orbax": _Saves(state, f"{tmp}/orbax", digest=False),
    }
    times = interleaved(saves, repeats)
    out.append(_pair("checkpoint save + digest / Orbax save", times, f"{what}; until written"))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with_digest = saves["digest"].ckpt
    plain = saves["orbax"].manager
    restores = {
        "digest": lambda: with_digest.restore(abstract, with_digest.latest_step()),
        "orbax": lambda: plain.restore(
            plain.latest_step(), args=ocp.args.StandardRestore(abstract)
        ),
    }
    times = interleaved(restores, repeats)
    out.append(_pair("checkpoint restore + verify / Orbax restore", times, what))
    with_digest.close()
    plain.close()
  # The floor: one read of every array, as a plain sum of each.
  read_once = jax.jit(lambda leaves: [jnp.sum(x) for x in leaves])
  times = interleaved(
      {"digest": lambda: state_digest(state), "sum": lambda: read_once(leaves)}, repeats
  )
  digest = statistics.median(times["digest"])
  out.append(
      row(
          "digest of the DQO state / a sum of every array",
          digest * 1e3,
          baseline=statistics.median(times["sum"]) * 1e3,
          ratio=median_ratio(times["digest"], times["sum"]),
          unit="ms",
          notes=f"{n_bytes / digest / 1e6:,.0f} MB/s on {jax.default_backend()}; {what}",
      )
  )
  host = np.concatenate([np.asarray(x).reshape(-1).view(np.uint8) for x in leaves]).tobytes()
  for name in ("blake2b", "sha256"):
    fn = lambda: hashlib.new(name, host).digest()
    seconds = statistics.median(interleaved({name: fn}, repeats)[name])
    out.append(
        row(
            f"host {name} of the same bytes",
            seconds * 1e3,
            unit="ms",
            notes=f"{n_bytes / seconds / 1e6:,.0f} MB/s, one core (hashlib)",
        )
    )
  return out


def _pair(name: str, times: dict, what: str) -> dict:
  ours, base = statistics.median(times["digest"]), statistics.median(times["orbax"])
  return row(
      name,
      ours * 1e3,
      baseline=base * 1e3,
      ratio=median_ratio(times["digest"], times["orbax"]),
      unit="ms",
      notes=what,
  )


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  print(markdown(rows(parser.parse_args().quick)))
