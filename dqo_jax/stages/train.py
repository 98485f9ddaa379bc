"""Stage `train`: the method in `config.method` (`dqo_jax.methods`) on the offline samples, from
the SFT checkpoint.

Every method starts from the same SFT policy (also the reference policy, whose log-probs the
sample stage stored), reads its view of the same offline dataset (`data/views.py`) and gets the
same number of steps and batch size (`config.train`). DQO and DRO also train a value model,
initialised from the SFT trunk with a fresh zero scalar head. Outputs go to DIR/<run name>.
"""

from __future__ import annotations

import os

import jax

from dqo_jax import distributed, lora, methods, rng
from dqo_jax.data.offline import offline_arrays
from dqo_jax.generation import logprobs_of
from dqo_jax.metrics import write_json_atomic
from dqo_jax.stages import artifacts
from dqo_jax.stages.context import Context
from dqo_jax.stages.measure import accuracy_monitor
from dqo_jax.stages.sample import draw
from dqo_jax.train.build import build_train_step
from dqo_jax.train.loop import fit


def train_data(ctx: Context, reference, samples_dir: str = "sample") -> methods.TrainData:
  """What the method's view may read: the gold solutions, the samples (in `samples_dir`), the
  rollouts; `reference()` gives pi_ref's parameters."""
  cfg = ctx.config

  def read_samples():
    records = artifacts.read_samples(ctx, samples_dir)
    return records, offline_arrays(
        records, cfg.data, ctx.tokenizer.pad_id, ctx.model_cfg.vocab_size
    )

  return methods.TrainData(
      config=cfg,
      gold=ctx.gold,
      # The sampled prompts' gold solutions, when training may read them: not when answers only.
      known=None if ctx.answers_only else ctx.train,
      read_samples=read_samples,
      reference_logprobs=lambda *arrays: logprobs_of(
          ctx.policy_model, reference(), *arrays, mesh=ctx.mesh, batch_size=cfg.sample.batch_size
      ),
      read_potentials=lambda: artifacts.read_potentials(ctx),
  )


def run(ctx: Context) -> dict:
  """One round (`train.rounds` = 1): the method on the sample stage's samples, from the SFT
  policy, with the SFT policy as pi_ref. With R rounds, round r > 1 samples the policy round
  r - 1 ended with, as the sample stage does, and trains `train.steps` more steps from it; pi_ref
  stays the SFT policy (`train.round_reference="sft"`) or is the round's starting policy
  ("previous"). Rounds 1 to R - 1 write to DIR/<run>/round<r>/, the last to DIR/<run>/, where
  the evaluation reads it; a finished round is skipped when the stage resumes."""
  cfg = ctx.config
  name = methods.run_name(cfg)
  rounds = cfg.train.get("rounds", 1)
  if rounds == 1:
    return _train(ctx, name, "sample")[1]
  directories = [os.path.join(name, f"round{r}") for r in range(1, rounds)] + [name]
  finished = lambda r: os.path.exists(os.path.join(ctx.workdir, directories[r - 1], ROUND_DONE))
  first = next(r for r in range(1, rounds + 1) if r == rounds or not finished(r))
  sft = ctx.sft_params()
  # Resuming: the newest finished round's policy, read once.
  start = (
      sft if first == 1 else artifacts.trained_policy_params(ctx, directory=directories[first - 2])
  )
  for r in range(first, rounds + 1):
    directory = directories[r - 1]
    reference = start if cfg.train.round_reference == "previous" else sft
    drawn = None
    if r > 1 and not os.path.exists(os.path.join(ctx.workdir, directory, artifacts.SAMPLES_FILE)):
      key = jax.random.fold_in(rng.key(cfg.seed, "rounds.sample"), r)
      records, drawn = draw(ctx, start, reference, key)
      artifacts.write_samples(ctx, records, directory)
      ctx.copy_up()
      distributed.barrier(f"{directory} samples")  # every process reads what process 0 wrote
      if ctx.remote is not None and not distributed.is_writer():
        ctx.remote.pull()
      print(
          f"[{name}] round {r} of {rounds}: {drawn['num_samples']} samples of the round {r - 1} "
          f"policy, {drawn['fraction_correct']:.3f} correct, {drawn['prompts_mixed']:.3f} of "
          "prompts mixed"
      )
    samples_dir = "sample" if r == 1 else directory
    start, summary = _train(ctx, directory, samples_dir, (r, start, reference, sft))
    summary = dict(summary, round=r, **({"samples": drawn} if drawn else {}))
    if r < rounds:
      write_json_atomic(os.path.join(ctx.workdir, directory, ROUND_DONE), summary)
      print(f"[{name}] round {r} of {rounds} done: its summary is in {directory}/{ROUND_DONE}")
  return summary


# Written in a round's directory when `train.rounds` > 1 finished it (the last round's is the
# stage's DONE.json).
ROUND_DONE = "ROUND_DONE.json"


def _train(ctx: Context, directory: str, samples_dir: str, rounds=None):
  """(the trained policy's parameters, summary) of one run of the method in DIR/<directory> on
  the samples in DIR/<samples_dir>: from the SFT policy, which is also pi_ref, or with `rounds`
  = (round r, its starting policy, its pi_ref, the SFT policy) from that round's start."""
  cfg = ctx.config
  name = methods.run_name(cfg)
  round_index, start, reference, sft = rounds or (1, None, None, None)
  held = dict(start=ctx.sft_params() if start is None else start)

  def start_params():
    # The SFT policy in one round; with QLoRA, which holds it only quantized once the base is
    # built, that base dequantized when read (also where the policy starts).
    return held["start"] if held["start"] is not None else lora.dequantize(base)

  view = methods.of(cfg).view(
      train_data(ctx, start_params if reference is None else lambda: reference, samples_dir)
  )
  step = build_train_step(cfg, ctx.model_cfg, ctx.mesh, view)
  base = step.base_of(held["start"])  # LoRA's frozen base, else None
  if step.quantized_base:
    held["start"] = None
  init_key = rng.key(cfg.seed, "train.init")
  if round_index > 1:
    init_key = jax.random.fold_in(rng.key(cfg.seed, "rounds.init"), round_index)
  state, summary = fit(
      stage_dir=ctx.stage_dir(directory),
      init_fn=step.init_fn,
      step_fn=step.step_fn,
      batch_at=view.batch_at,
      num_steps=cfg.train.steps,
      mesh=ctx.mesh,
      rules=ctx.rules,
      rng=init_key,
      checkpoint_cfg=cfg.checkpoint,
      max_nonfinite=cfg.train.max_consecutive_nonfinite,
      log_every=cfg.log_every,
      desc=name if rounds is None else f"{name} round {round_index}",
      init_args=(held["start"],),  # None with QLoRA, whose adapters start without it
      on_log=accuracy_monitor(
          ctx,
          lambda state: step.policy_params(state, base),
          # E[R] - beta KL is measured against the SFT policy, whatever the round's pi_ref.
          ref_params_of=start_params if sft is None else lambda: sft,
      ),
      checkpoint_dir=ctx.checkpoint_dir(directory),
      on_save=ctx.copy_up,
      base=base,
      base_shardings=step.base_shardings,
  )
  summary = dict(summary, method=cfg.method, examples=view.size, **view.describe)
  # Only a next round needs the policy as parameters (with LoRA, folding would copy the base).
  return (step.policy_params(state, base) if rounds else None), summary
