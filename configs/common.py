"""What configs/gsm8k.py and configs/math.py share: optimizers, mesh, stages, pretrained presets.

Not a config itself; the task configs load it by path (`_sibling("common")`).
"""

import ml_collections

# Presets that fine-tune a pretrained model: its weights and tokenizer come from
# --config.model.path=DIR (a local copy of the Hugging Face repository named here).
PRETRAINED = {
    "qwen2_7b": dict(name="Qwen2-7B", hf_repo="Qwen/Qwen2-7B", family="qwen2"),
    "gemma_7b": dict(name="Gemma-7B", hf_repo="google/gemma-7b", family="gemma"),
    "llama3_8b": dict(name="Llama-3-8B", hf_repo="meta-llama/Meta-Llama-3-8B", family="llama3"),
}


def optimizer(lr, warmup_steps, *, weight_decay=0.0):
  return ml_collections.ConfigDict(
      dict(
          lr=lr,
          warmup_steps=warmup_steps,
          end_lr_fraction=0.1,
          weight_decay=weight_decay,
          grad_clip=1.0,
          b2=0.98,
      )
  )


def base_config():
  """Everything but `data`, `tokenizer` and `model`, at the scale of a pretrained 7B model."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "sft,sample,dqo,eval"
  # Mesh sizes over all devices (-1 = the rest) and logical-axis -> mesh-axis rules.
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
  )
  c.checkpoint = dict(every=200, keep=2)
  c.log_every = 10
  c.sft = dict(steps=1000, batch_size=64, optimizer=optimizer(1e-5, 50))
  c.sample = dict(num_prompts=-1, samples_per_prompt=4, temperature=1.0, batch_size=64)
  c.rewards = dict(correct=1.0, incorrect=0.0, unparseable=0.0)
  c.dqo = dict(
      steps=1000,
      batch_size=64,
      beta=0.1,
      lam=1.0,
      importance_traces=False,
      rho_max=1.0,
      c_max=1.0,
      loss_norm="token",
      value_warmup_steps=0,
      policy_optimizer=optimizer(1e-6, 20),
      value_optimizer=optimizer(1e-5, 20),
  )
  c.eval = dict(num_examples=-1, batch_size=64, max_new_tokens=512, every=200, monitor_examples=128)
  return c


def pretrained_model(preset: str):
  """The `model` section of a pretrained preset: `path` is what the user must supply."""
  return ml_collections.ConfigDict(dict(path="", dtype="bfloat16", **PRETRAINED[preset]))


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
          dtype="float32",
      )
  )


def tiny_schedule(c):
  """Few steps, few prompts, data-parallel mesh: the whole pipeline in about a minute on CPU."""
  c.mesh.update(data=-1, fsdp=1)
  c.sft.update(steps=20, batch_size=8, optimizer=optimizer(1e-3, 5, weight_decay=0.01))
  c.sample.update(num_prompts=32, samples_per_prompt=2, batch_size=32)
  c.dqo.update(
      steps=10,
      batch_size=8,
      beta=0.5,
      policy_optimizer=optimizer(1e-4, 2),
      value_optimizer=optimizer(1e-3, 2),
  )
  c.eval.update(batch_size=32, every=10, monitor_examples=32)
  c.checkpoint.update(every=5)
  c.log_every = 5
