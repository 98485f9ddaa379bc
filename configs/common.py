"""What configs/gsm8k.py and configs/math.py share: optimizers, mesh, stages, pretrained presets.

Not a config itself; the task configs import it (`from configs import common`), which works
wherever `dqo_jax` does: from the repository's root.
"""

import ml_collections

from dqo_jax import lora, methods, tasks

# Presets that fine-tune a pretrained model: its weights and tokenizer come from
# --config.model.path=DIR (a local copy of the Hugging Face repository named here).
PRETRAINED = {
    "qwen2_0_5b": dict(name="Qwen2-0.5B", hf_repo="Qwen/Qwen2-0.5B"),
    "qwen2_1_5b": dict(name="Qwen2-1.5B", hf_repo="Qwen/Qwen2-1.5B"),
    "qwen2_7b": dict(name="Qwen2-7B", hf_repo="Qwen/Qwen2-7B"),
    "gemma_7b": dict(name="Gemma-7B", hf_repo="google/gemma-7b"),
    "llama3_8b": dict(name="Llama-3-8B", hf_repo="meta-llama/Meta-Llama-3-8B"),
}


# Logical axis -> mesh axis: batch over (data, fsdp), weights FSDP over embed, TP over the rest.
# A mesh axis serves the first rule that names it, so activations [batch, length, embed] are
# split over batch only. "length" stays whole: the lambda-return scan runs along it.
MESH_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the stacked axis of scanned decoder layers (model.scan_layers)
)


def optimizer(lr, warmup_steps, *, weight_decay=0.0):
  return ml_collections.ConfigDict(
      dict(
          lr=lr,
          warmup_steps=warmup_steps,
          end_lr_fraction=0.1,
          weight_decay=weight_decay,
          grad_clip=1.0,
          b2=0.98,
          # "adamw", or "adafactor" (factored second moment, no first moment: about no state
          # per parameter, where AdamW keeps 8 bytes); mu_dtype: AdamW's first moment,
          # "float32" or "bfloat16" (2 bytes less per parameter). dqo_jax/train/state.py.
          name="adamw",
          mu_dtype="float32",
      )
  )


def add_methods(c, *, steps, batch_size, policy_lr, value_lr, beta):
  """The `train` stage's method and each method's section; every method starts from the SFT
  checkpoint and gets the same steps and batch size (`c.train`)."""
  c.method = "dqo"  # a module of dqo_jax/methods: sft, rft, dpo, kto, rloo, dro or dqo
  c.train = dict(
      steps=steps,
      batch_size=batch_size,  # examples per step: sequences, or (chosen, rejected) pairs for DPO
      grad_accum_steps=1,  # micro-batches per step: the same update with 1/k of the activations
      # > 1: batches of similar response lengths, padded to one of at most this many widths (as
      # many train-step compilations; benchmarks/padding.py); 1: all padded to max_response_len.
      length_buckets=8,
      # R > 1: after training, sample the trained policy as the sample stage does, train
      # `steps` more from it, R times in all; pi_ref stays the SFT policy ("sft") or is each
      # round's starting policy ("previous"). dqo_jax/stages/train.py.
      rounds=1,
      round_reference="sft",
      policy_optimizer=optimizer(policy_lr, 20),
      value_optimizer=optimizer(value_lr, 20),  # DQO's V(s) and DRO's V(x)
      # Steps in a row whose loss or gradient is not finite (their updates are skipped) before
      # the run saves its last good state and stops.
      max_consecutive_nonfinite=10,
  )
  methods.add_config_sections(c, beta)  # dqo_jax/methods/<name>.py holds each section's defaults


def base_config():
  """Everything but `data`, `tokenizer` and `model`, at the scale of a pretrained 7B model."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "sft,sample,rollouts,train,eval"  # rollouts: only for DQO + process
  # Mesh sizes over all devices (-1 = the rest) and logical-axis -> mesh-axis rules.
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.mesh.rules = MESH_RULES
  c.checkpoint = dict(every=200, keep=2)
  c.log_every = 10
  c.sft = dict(
      steps=1000,
      batch_size=64,
      grad_accum_steps=1,
      # As train.length_buckets. Not validated for these presets; on the embedded task 8 buckets
      # slowed SFT's generalisation (docs/results.md), and configs/arith.py uses 1.
      length_buckets=8,
      optimizer=optimizer(1e-5, 50),
      max_consecutive_nonfinite=10,
  )
  c.sample = dict(
      num_prompts=-1,
      samples_per_prompt=4,
      temperature=1.0,
      batch_size=64,
      # C > 0: refilled decode slots (the sample stage): whenever C of the batch_size
      # rows have ended, C new ones are prefilled into them, so no row waits for the batch's
      # longest. Faster, and other random draws than batches (0) from the same distribution.
      refill_rows=16,
  )
  # Rewards of a verified response; a response cut at the length limit counts as unparseable.
  c.rewards = dict(correct=1.0, incorrect=0.0, unparseable=0.0)
  add_methods(c, steps=1000, batch_size=64, policy_lr=1e-6, value_lr=1e-5, beta=0.1)
  # samples_per_problem = k > 0: also the accuracy of temperature samples, pass@k and maj@k
  c.eval = dict(
      num_examples=-1,
      batch_size=64,
      max_new_tokens=512,
      every=200,
      monitor_examples=128,
      samples_per_problem=0,
      # Greedy decoding (the eval stage and the monitor) in refilled decode slots, C rows
      # refilled at a time (see sample.refill_rows): the same tokens as batches; 0: batches.
      refill_rows=16,
      test=True,  # False: the eval stage scores validation only (dqo_jax.compare --split)
  )
  return c


def task_config(task, *, max_prompt_len, max_response_len):
  """base_config() with the `data` section of a real task (GSM8K, MATH) and its tokenizer; the
  prompt's instruction and template are the task's (dqo_jax/tasks/<task>.py)."""
  spec = tasks.get(task)
  c = base_config()
  c.data = dict(
      task=task,
      dir="",  # "" = <workdir>/data; the prepared TFDS dataset (and any tokenizer) live there
      local_dir="",  # a local copy of the data; what "" means depends on the task
      num_train=-1,  # keep the first N examples of a split (-1 = all)
      num_test=-1,
      # The last N train examples, held out: monitoring while training and every choice of
      # settings read this split, never test (dqo_jax/data/tasks.py).
      num_validation=500,
      num_gold=-1,  # the first N train examples keep their solutions; see configs/arith.py
      max_prompt_len=max_prompt_len,
      max_response_len=max_response_len,
      prompt=dict(
          style="zero_shot",  # or "few_shot"
          num_shots=4,  # few_shot only
          exemplars="builtin",  # few_shot: "builtin" (dqo_jax/data/prompts.py) or "train"
          instruction=spec.instruction,
          template=spec.template,
          chat_template="",  # "" = plain text; "model" = the tokenizer's chat template
      ),
  )
  c.tokenizer = dict(vocab_size=0)  # 0: the pretrained model's own tokenizer
  c.eval.max_new_tokens = max_response_len
  return c


# How a model runs, for every preset: `dtype` is the compute dtype (bfloat16 matmuls, with
# parameters and optimizer state kept in float32 as master copies); `remat` is what each decoder
# block keeps for the backward pass: "none", "dots" (matmul outputs) or "full" (recompute it all;
# least memory); `attention` is the kernel (dqo_jax/attention.py); `logprob_chunk` > 0 computes
# the train steps' response log-probs that many positions at a time, so that the float32
# [batch, response, vocab] logits never exist whole (0: whole; benchmarks/train_steps.py).
# `lora`: rank > 0 trains low-rank adapters on the `targets` projections (q, k, v, o, gate, up,
# down) over one frozen base instead of every weight (dqo_jax/lora.py); rank 0 (the default)
# trains every weight. `scan_layers` runs the decoder blocks under one nn.scan, their parameters
# stacked on a "layers" axis: one block to compile instead of n_layers (on for the pretrained
# presets; QLoRA needs it off). `--compile_only` shows what each choice costs on a TPU slice
# (docs/scaling.md).
def run_options() -> dict:
  return dict(
      dtype="bfloat16", remat="none", attention="xla", logprob_chunk=0, lora=lora.defaults()
  )


def pretrained_model(preset: str):
  """The `model` section of a pretrained preset: `path` is what the user must supply."""
  return ml_collections.ConfigDict(
      dict(path="", scan_layers=True, **run_options(), **PRETRAINED[preset])
  )


def tiny_model():
  """A small Llama-style model trained from scratch: for CPU smoke runs."""
  return ml_collections.ConfigDict(
      dict(
          d_model=32,
          n_layers=2,
          n_heads=2,
          n_kv_heads=1,
          head_dim=16,
          d_ff=64,
          rope_theta=10_000.0,
          tie_embeddings=True,
          dtype="float32",  # a model this small runs on CPU, where bfloat16 gains nothing
          attention="xla",
          remat="none",
          logprob_chunk=0,
          lora=lora.defaults(),
      )
  )


def tiny_schedule(c):
  """Few steps, few prompts, data-parallel mesh: the whole pipeline in about a minute on CPU."""
  c.mesh.update(data=-1, fsdp=1)
  c.data.num_validation = 4
  c.sft.update(steps=20, batch_size=8, optimizer=optimizer(1e-3, 5, weight_decay=0.01))
  c.sample.update(num_prompts=32, samples_per_prompt=2, batch_size=32, refill_rows=0)
  c.train.update(
      steps=10,
      batch_size=8,
      policy_optimizer=optimizer(1e-4, 2),
      value_optimizer=optimizer(1e-3, 2),
  )
  c.dqo.update(beta=0.5)
  c.dqo.process.update(rollouts_per_step=2, batch_size=64)
  c.eval.update(batch_size=32, every=10, monitor_examples=32, refill_rows=0)
  c.checkpoint.update(every=5)
  c.log_every = 5
