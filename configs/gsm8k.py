"""GSM8K: grade-school math word problems (7,473 train / 1,319 test), answers as "#### N".

    python -m dqo_jax.main --config=configs/gsm8k.py:qwen2_7b --config.model.path=DIR --workdir=W
    python -m dqo_jax.main --config=configs/gsm8k.py:tiny --workdir=/tmp/gsm8k_tiny   # CPU, ~1 min

Presets (the part after ':'):
  qwen2_7b (the default), qwen2_0_5b, qwen2_1_5b, gemma_7b, llama3_8b: fine-tune that pretrained
      model, whose weights and tokenizer are read from --config.model.path=DIR (required).
      `--compile_only --topology=v5p-16` sizes the DQO step on a TPU slice without them
      (docs/scaling.md).
  tiny: a 2-layer model and a SentencePiece tokenizer trained from scratch on a slice of the
      official files the repository carries (data/gsm8k, MIT licence); it proves the plumbing,
      its accuracy is near zero.

Data: data.local_dir="" downloads the official files through TFDS's `gsm8k` builder on first use;
--config.data.local_dir=DIR prepares the same splits offline from DIR/train.jsonl and
DIR/test.jsonl; the repository carries a copy (`--config.data.local_dir=data/gsm8k` from its
root). Prompt formats: data.prompt (see dqo_jax/data/prompts.py and docs/data.md).
"""

import os

from configs import common

# The repository's copy of the official files (data/README.md), found from this file so that a
# preset works from any working directory.
GSM8K_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "gsm8k")
)


def get_config(arg: str = ""):
  preset = arg or "qwen2_7b"
  c = common.task_config(
      "gsm8k",
      max_prompt_len=320,
      max_response_len=384,
  )
  # data.local_dir: "" = download with TFDS; else a directory with train.jsonl and test.jsonl

  if preset in common.PRETRAINED:
    c.model = common.pretrained_model(preset)
  elif preset == "tiny":
    c.data.update(
        local_dir=GSM8K_DIR, num_train=512, num_test=32, max_prompt_len=256, max_response_len=256
    )
    c.tokenizer.vocab_size = 1024
    c.model = common.tiny_model()
    common.tiny_schedule(c)
    c.eval.max_new_tokens = c.data.max_response_len
  else:
    raise ValueError(
        f"configs/gsm8k.py: unknown preset {arg!r}; use one of {sorted(common.PRETRAINED)} or 'tiny'"
    )
  return c
