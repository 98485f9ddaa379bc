"""MATH: competition mathematics (Hendrycks et al.), answers in \\boxed{}; levels 1-5.

    python -m dqo_jax.main --config=configs/math.py:qwen2_7b --config.data.local_dir=MATH \\
        --config.model.path=DIR --workdir=W
    python -m dqo_jax.main --config=configs/math.py:tiny --workdir=/tmp/math_tiny   # CPU, ~1 min

MATH is never downloaded: --config.data.local_dir=DIR must hold it, each split either as
DIR/<split>/<subject>/<id>.json (the original release) or DIR/<split>.jsonl (MATH-500 style);
docs/data.md says where to get it. Evaluation groups accuracy by difficulty level: results.json's
`by_steps` is per level for this task.

Presets (the part after ':'):
  qwen2_7b (the default), qwen2_0_5b, qwen2_1_5b, gemma_7b, llama3_8b: fine-tune that pretrained
      model, whose weights and tokenizer are read from --config.model.path=DIR (required).
      `--compile_only --topology=v5p-16` sizes the DQO step on a TPU slice without them
      (docs/scaling.md).
  tiny: a 2-layer model and a SentencePiece tokenizer trained from scratch on 24 made-up problems
      in MATH's layout that the repository carries (data/math_made_up/math_hendrycks, none from
      MATH); it proves the plumbing only.
"""

import os

from configs import common

# Found from this file, so that the preset works from any working directory.
MADE_UP = os.path.normpath(
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "data", "math_made_up", "math_hendrycks"
    )
)


def get_config(arg: str = ""):
  preset = arg or "qwen2_7b"
  c = common.task_config(
      "math",
      max_prompt_len=512,
      max_response_len=1024,
  )
  # data.local_dir: required: a local copy of MATH (see above)

  if preset in common.PRETRAINED:
    c.model = common.pretrained_model(preset)
  elif preset == "tiny":
    c.data.update(local_dir=MADE_UP, max_prompt_len=128, max_response_len=96)
    c.tokenizer.vocab_size = 256
    c.model = common.tiny_model()
    common.tiny_schedule(c)
    c.sample.update(num_prompts=16, batch_size=16)
    c.eval.update(batch_size=8, monitor_examples=8, max_new_tokens=c.data.max_response_len)
  else:
    raise ValueError(
        f"configs/math.py: unknown preset {arg!r}; use one of {sorted(common.PRETRAINED)} or 'tiny'"
    )
  return c
