"""Our sampler and DPO step against Hugging Face `generate` and Tunix, on the same random weights.

    python -m benchmarks.sampler [--quick]

One Llama-style model (random weights, nothing downloaded) is written as a Hugging Face
checkpoint by `dqo_jax.convert.export_hf`; transformers' LlamaForCausalLM and Tunix's Llama3
load that checkpoint, we use the parameters it was written from. Every row is a ratio of runs
interleaved with each other (ours, theirs, ours, ...), median of the repeats, warm-up dropped.

Tunix (google-tunix 0.1.7, benchmarks/requirements-tunix.txt) needs an older transformers than
ours, so it runs in its own venv, as a subprocess (`benchmarks/tunix_worker.py`):

    python -m venv --system-site-packages ~/.cache/dqo_jax/venv-tunix
    ~/.cache/dqo_jax/venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt

The environment variable `TUNIX_PYTHON` names that venv's python (default
~/.cache/dqo_jax/venv-tunix/bin/python); without one there the Tunix rows keep a null baseline
and say why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.timing import row
from dqo_jax import convert
from dqo_jax.model import ModelConfig, Transformer
from dqo_jax.sampler import generate
from dqo_jax.train.forward import response_logprobs
from dqo_jax.methods import dpo
from dqo_jax.train.policy_step import make_policy_step
from dqo_jax.train.state import TrainState

# The project's embedded model (configs/arith.py: ModelConfig defaults, 256-token vocabulary),
# untied as Llama. Tunix's Llama3 rotary embedding ignores its config's rope_theta and always
# uses 1e6, so the model uses 1e6 for all three implementations to compute the same function.
MODEL = ModelConfig(vocab_size=256, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False)
PAD = 0
EOS = MODEL.vocab_size  # never generated: every row decodes the full length in all three
BATCH, PROMPT_LEN = 32, 64  # the arith config's prompt and response lengths
DPO_PAIRS, DPO_RESPONSE_LEN, DPO_BETA, DPO_LR = 8, 64, 0.1, 1e-6
DEFAULT_TUNIX_PYTHON = "~/.cache/dqo_jax/venv-tunix/bin/python"
TUNIX_PYTHON = os.path.expanduser(os.environ.get("TUNIX_PYTHON", DEFAULT_TUNIX_PYTHON))


def _shapes(quick: bool) -> dict:
  return dict(new_tokens=32, repeats=5) if quick else dict(new_tokens=64, repeats=15)


def _left_padded(rng, rows: int, length: int, shortest: int):
  tokens = np.full((rows, length), PAD, np.int32)
  for i, n in enumerate(rng.integers(shortest, length + 1, rows)):
    tokens[i, length - n :] = rng.integers(3, MODEL.vocab_size, n)
  return tokens, (tokens != PAD).astype(np.int32)


def _interleaved(runs: dict, repeats: int) -> dict:
  """Median seconds of each run, the runs taking turns; the first round is warm-up."""
  times = {name: [] for name in runs}
  for r in range(repeats + 1):
    names = list(runs) if r % 2 else list(runs)[::-1]  # alternate who goes first
    for name in names:
      seconds = runs[name]()
      if r:
        times[name].append(seconds)
  return {name: statistics.median(t) for name, t in times.items()}


def _timed(fn):
  def run():
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  return run


class TunixWorker:
  """The Tunix worker subprocess; `run(name)` -> (seconds, output) of one run there."""

  def __init__(self, spec: dict):
    worker = os.path.join(os.path.dirname(__file__), "tunix_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.proc = subprocess.Popen(
        [TUNIX_PYTHON, worker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    self.proc.stdin.write(json.dumps(spec) + "\n")
    self.proc.stdin.flush()
    self.version = self._reply()["jax"]

  def _reply(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT ") :])
    raise RuntimeError("Tunix worker died: " + self.proc.stderr.read()[-2000:])

  def run(self, name: str):
    self.proc.stdin.write(name + "\n")
    self.proc.stdin.flush()
    out = self._reply()
    return out["seconds"], out["out"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> str:
  same = ours == theirs
  return f"greedy tokens agree: {same.all(1).sum()}/{len(same)} rows, {same.mean():.3f} of tokens"


def _dpo_batch(rng, r: int):
  prompt, prompt_mask = _left_padded(rng, DPO_PAIRS, PROMPT_LEN, PROMPT_LEN // 2)
  lengths = rng.integers(r // 2, r + 1, 2 * DPO_PAIRS)
  response = rng.integers(3, MODEL.vocab_size, (2 * DPO_PAIRS, r)).astype(np.int32)
  response_mask = (np.arange(r)[None] < lengths[:, None]).astype(np.int32)
  response = response * response_mask
  return prompt, prompt_mask, response, response_mask, lengths.astype(np.int32)


def _ours_dpo(params, batch_parts):
  prompt, prompt_mask, response, _, lengths = batch_parts
  model = Transformer(MODEL)
  batch = dict(
      prompt=np.concatenate([prompt, prompt]),
      prompt_mask=np.concatenate([prompt_mask, prompt_mask]),
      response=response,
      response_len=lengths,
  )
  batch["ref_logprobs"] = jax.jit(lambda p, b: response_logprobs(model, p, b))(params, batch)
  tx = optax.adamw(DPO_LR)
  step = jax.jit(make_policy_step(model, tx, dpo.objective(DPO_BETA)), donate_argnums=0)
  state = [TrainState.create(jax.tree.map(jnp.copy, params), tx)]

  def run():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics["loss"])

  return run


def _hf_generate(directory, prompt, mask, new_tokens):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
  hf = hf.float().eval()
  ids, attn = torch.from_numpy(prompt).long(), torch.from_numpy(mask).long()

  def run():
    with torch.no_grad():
      out = hf.generate(
          input_ids=ids,
          attention_mask=attn,
          max_new_tokens=new_tokens,
          do_sample=False,
          pad_token_id=PAD,  # the checkpoint has no EOS: every row decodes the full length
      )
    return out[:, prompt.shape[1] :].numpy()

  # On this shared, oversubscribed machine torch's OpenMP threads can run many times slower
  # than one thread, so the baseline gets whichever thread count is faster here.
  seconds = {}
  for threads in sorted({1, len(os.sched_getaffinity(0))}):
    torch.set_num_threads(threads)
    run()
    seconds[threads] = _timed(run)()
  threads = min(seconds, key=seconds.get)
  torch.set_num_threads(threads)
  version = f"transformers {transformers.__version__}, torch {torch.__version__} CPU"
  return run, f"{version}, {threads} torch thread(s) (the faster of {sorted(seconds)})"


def _row(name, ours, baseline, target, unit, notes):
  ratio = ours / baseline if baseline else None
  out = row(
      name,
      ours,
      unit=unit,
      baseline=baseline,
      ratio=ratio,
      target=target,
      at_least=True,
      notes=notes,
  )
  # The target is on the ratio: without a baseline (Tunix not installed) it is not judged.
  return out if ratio is not None else dict(out, met=None)


def rows(quick: bool) -> list[dict]:
  shapes = _shapes(quick)
  r, repeats = shapes["new_tokens"], shapes["repeats"]
  model = Transformer(MODEL)
  init_tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(
      model.init(jax.random.key(0), init_tokens, jnp.ones_like(init_tokens))["params"]
  )
  rng = np.random.default_rng(0)
  prompt, mask = _left_padded(rng, BATCH, PROMPT_LEN, PROMPT_LEN // 2)
  dpo_parts = _dpo_batch(rng, DPO_RESPONSE_LEN)
  shape_note = (
      f"batch {BATCH}, prompt {PROMPT_LEN} (left-padded), {r} new tokens, greedy, "
      f"{MODEL.n_layers} layers d_model {MODEL.d_model} vocab {MODEL.vocab_size}, float32 CPU, "
      f"median of {repeats} interleaved runs"
  )

  def ours_sample():
    s = generate(
        model,
        params,
        prompt,
        mask,
        jax.random.key(0),
        max_new_tokens=r,
        eos_id=EOS,
        pad_id=PAD,
        greedy=True,
    )
    return np.asarray(s.tokens)

  tokens = BATCH * r
  with tempfile.TemporaryDirectory() as directory:
    convert.export_hf(params, MODEL, directory, dtype="float32", base_config=dict(pad_token_id=PAD))
    # Tunix first: torch's threads are then not yet in this process while JAX is timed.
    tunix_rows = _tunix_rows(
        directory, params, prompt, mask, dpo_parts, ours_sample, r, repeats, shape_note
    )
    hf_run, hf_version = _hf_generate(directory, prompt, mask, r)
    ours_tokens, hf_tokens = ours_sample(), hf_run()
    t = _interleaved(dict(ours=_timed(ours_sample), hf=_timed(hf_run)), repeats)
  hf_row = _row(
      "sampler vs HF transformers generate",
      tokens / t["ours"],
      tokens / t["hf"],
      2.0,
      "generated tokens/s",
      f"{shape_note}; {hf_version}; {_agreement(ours_tokens, hf_tokens)}",
  )
  return [hf_row, *tunix_rows]


def _tunix_rows(directory, params, prompt, mask, dpo_parts, ours_sample, r, repeats, shape_note):
  dpo_note = (
      f"DPO train step, {DPO_PAIRS} pairs ({2 * DPO_PAIRS} sequences) of prompt {PROMPT_LEN} + "
      f"response {DPO_RESPONSE_LEN}, adamw, reference log-probs precomputed on both sides"
  )
  names = ("sampler vs Tunix sampler", "DPO train step vs Tunix DPOTrainer")
  if not os.path.exists(TUNIX_PYTHON):
    why = (
        f"Tunix not run: no python at TUNIX_PYTHON (default {DEFAULT_TUNIX_PYTHON}; see "
        "benchmarks/requirements-tunix.txt)"
    )
    return [
        _row(names[0], None, None, 1.2, "generated tokens/s", f"{shape_note}; {why}"),
        _row(names[1], None, None, 1.0, "train steps/s", f"{dpo_note}; {why}"),
    ]
  prompt_p, prompt_mask, response, response_mask, _ = dpo_parts
  half = DPO_PAIRS
  spec = dict(
      weights=directory,
      hf_config=json.load(open(os.path.join(directory, "config.json"))),
      sample=dict(
          prompts=[row[m.astype(bool)].tolist() for row, m in zip(prompt, mask)],
          prompt_len=PROMPT_LEN,
          new_tokens=r,
          pad_id=PAD,
          eos_id=EOS,
      ),
      dpo=dict(
          lr=DPO_LR,
          beta=DPO_BETA,
          batch=dict(
              prompt_ids=prompt_p.tolist(),
              prompt_mask=prompt_mask.tolist(),
              chosen_ids=response[:half].tolist(),
              chosen_mask=response_mask[:half].tolist(),
              rejected_ids=response[half:].tolist(),
              rejected_mask=response_mask[half:].tolist(),
          ),
      ),
  )
  tunix = TunixWorker(spec)
  try:
    ours_tokens = ours_sample()
    _, tunix_tokens = tunix.run("sample")
    tunix_tokens = np.array([t + [PAD] * (r - len(t)) for t in tunix_tokens])
    t = _interleaved(dict(ours=_timed(ours_sample), tunix=lambda: tunix.run("sample")[0]), repeats)
    how = f"google-tunix 0.1.7 in its own venv (jax {tunix.version}), a subprocess"
    sample_row = _row(
        names[0],
        BATCH * r / t["ours"],
        BATCH * r / t["tunix"],
        1.2,
        "generated tokens/s",
        f"{shape_note}; Llama3 + Sampler, {how}; {_agreement(ours_tokens, tunix_tokens)}",
    )
    d = _interleaved(
        dict(
            ours=_timed(_ours_dpo(params, dpo_parts)),
            tunix=lambda: tunix.run("dpo")[0],
        ),
        repeats,
    )
    dpo_row = _row(
        names[1],
        1 / d["ours"],
        1 / d["tunix"],
        1.0,
        "train steps/s",
        f"{dpo_note}; DPOTrainer, {how}",
    )
  finally:
    tunix.close()
  return [sample_row, dpo_row]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
  args = parser.parse_args(argv)
  for r in rows(args.quick):
    print(json.dumps(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
