"""What every stage needs: the config, the workdir, data, tokenizer, models and the mesh."""

from __future__ import annotations

import dataclasses
import functools
import os

from dqo_jax import convert, lora, methods, rng, sharding
from dqo_jax.checkpoint import restore_params
from dqo_jax.data import prompts, tasks
from dqo_jax.data.batches import Encoded, encode_examples
from dqo_jax.errors import UserError
from dqo_jax.model import ModelConfig, Transformer, with_overrides
from dqo_jax.peft_format import import_peft
from dqo_jax.tokenizer import Tokenizer
from dqo_jax.train import build
from dqo_jax.train.loop import init_state
from dqo_jax.workdir import Workdir

STAGES = ("sft", "sample", "rollouts", "train", "eval")


def stage_output(config, stage: str) -> str:
  """Where a stage writes, relative to the workdir: one directory per method for `train` and
  `eval`, so several methods share one workdir, its SFT checkpoint and its samples."""
  if stage == "train":
    return methods.run_name(config)
  if stage == "eval":
    return os.path.join("eval", methods.run_name(config))
  return stage


@dataclasses.dataclass
class Context:
  config: object
  workdir: str
  tokenizer: Tokenizer
  train: Encoded
  test: Encoded
  mesh: object
  # The run's workdir when it has a URL: checkpoints live there, files are copied to it.
  remote: Workdir | None = None
  # Held out from train (`config.data.num_validation`): what is monitored and chosen on.
  validation: Encoded | None = None

  def split(self, name: str) -> Encoded:
    """ "train" is the prompts the RL stages sample (`rl_prompts`), whose objective the monitor
    and the eval stage measure."""
    return {"train": self.rl_prompts, "validation": self.validation, "test": self.test}[name]

  @property
  def num_gold(self) -> int:
    n = self.config.data.num_gold
    return len(self.train) if n < 0 else n

  @functools.cached_property
  def gold(self) -> Encoded:
    """The training problems whose worked solutions supervised training reads (SFT, continued
    SFT, the gold part of RFT): the first `data.num_gold` (-1: all)."""
    return self.train.rows(0, self.num_gold)

  @functools.cached_property
  def rl_prompts(self) -> Encoded:
    """The training problems the sample stage draws prompts from: with `data.num_gold` set, the
    rest of train, of which only the final answer is read (the reward); otherwise all of it."""
    return self.train if self.num_gold == len(self.train) else self.train.rows(self.num_gold)

  @property
  def answers_only(self) -> bool:
    """Whether the sampled prompts' worked solutions are unknown to training."""
    return self.rl_prompts is not self.train

  @property
  def rules(self):
    return sharding.logical_rules(self.config.mesh)

  @functools.cached_property
  def model_cfg(self) -> ModelConfig:
    if self.config.model.get("path"):  # a pretrained model (dqo_jax.convert.load_pretrained)
      return with_overrides(convert.pretrained_config(self.config.model.path), self.config.model)
    return ModelConfig.from_config(self.config.model, self.tokenizer.vocab_size)

  @functools.cached_property
  def policy_model(self) -> Transformer:
    return build.models(self.config, self.model_cfg)[0]

  def checkpoint_dir(self, stage: str) -> str:
    return (self.remote or Workdir(self.workdir)).checkpoints(stage)

  def copy_up(self) -> None:
    """Copies the files written so far to the workdir's URL, if it has one (process 0)."""
    if self.remote is not None:
      self.remote.push()

  def stage_dir(self, stage: str) -> str:
    path = os.path.join(self.workdir, stage)
    os.makedirs(path, exist_ok=True)
    return path

  def init_params(self, model: Transformer, rng):
    """Freshly initialised parameters, boxed with their logical axis names; the pretrained
    checkpoint's for the policy when `config.model.path` is set."""
    if self.config.model.get("path") and model.head == "lm":
      return self._pretrained_params
    return build.boxed_init(model, rng)

  @functools.cached_property
  def _pretrained_params(self):
    path, cfg = self.config.model.path, self.model_cfg
    return convert.load_pretrained_params(
        path, self.mesh, self.rules, compute_dtype=cfg.dtype, scan_layers=cfg.scan_layers
    )[1]

  def _initial_policy(self, key):
    return self.init_params(self.policy_model, key)

  @functools.cached_property
  def _imported_adapters(self):
    """The adapters of the PEFT adapter `model.lora.init_from` names, in our layout."""
    directory = self.config.model.lora.init_from
    adapters, found = import_peft(directory, self.model_cfg)
    lora.check_imported(self.config.model.lora, found, directory)
    return adapters

  def sft_step(self) -> build.TrainStep:
    """The SFT stage's step, from the pretrained weights when `config.model.path` is set (and
    with LoRA, from the adapter `model.lora.init_from` names, if it names one)."""
    imported = None
    if lora.enabled(self.config, "sft") and self.config.model.lora.init_from:
      imported = lambda: self._imported_adapters
    return build.build_sft_step(
        self.config, self.model_cfg, self.mesh, self._initial_policy, imported
    )

  def sft_base(self, step: build.TrainStep):
    """With LoRA in the SFT stage, the base its adapters train over: the pretrained weights, or
    the fresh ones a full SFT would start from; None without."""
    if not step.adapters:
      return None
    key = rng.key(self.config.seed, "sft.init")
    return step.base_of(init_state(self._initial_policy, key, step.plain_shardings))

  def sft_params(self):
    """The SFT policy: the reference policy and DQO's starting point (with LoRA, the SFT
    adapters folded into their base)."""
    step = self.sft_step()
    try:
      state = restore_params(self.checkpoint_dir("sft"), step.abstract_state)
      return step.policy_params(state, self.sft_base(step))
    except FileNotFoundError:
      if not os.path.exists(os.path.join(self.workdir, "sft", "DONE.json")):
        raise
      raise UserError(
          f"no checkpoint in {self.checkpoint_dir('sft')}, although the 'sft' stage is marked "
          "done; run it again with --redo=sft"
      ) from None


def build_context(config, workdir: Workdir) -> Context:
  d = config.data
  tasks.check_model_path(config)
  task = tasks.load_task(config, workdir.path)
  tok = tasks.load_tokenizer(config, task)
  render = prompts.make_renderer(config, tok, task.splits["train"])
  enc = {
      s: encode_examples(tok, task.splits[s], d.max_prompt_len, d.max_response_len, render)
      for s in task.splits
  }
  for s, e in enc.items():
    if e.dropped:
      print(
          f"[data] {s}: dropped {e.dropped} of {e.dropped + len(e)} examples longer than "
          f"data.max_prompt_len={d.max_prompt_len}/max_response_len={d.max_response_len}"
      )
  num_gold = d.num_gold
  if num_gold >= 0 and not 0 < num_gold < len(enc["train"]):
    raise UserError(
        f"config.data.num_gold={num_gold}: the gold subset needs at least one training problem "
        f"and must leave some for the answers-only prompts ({len(enc['train'])} in train); set "
        "it between 1 and that minus 1, or -1 for gold solutions of all"
    )
  mesh = sharding.make_mesh(config.mesh)
  remote = workdir if workdir.url else None
  return Context(
      config, workdir.path, tok, enc["train"], enc["test"], mesh, remote, enc.get("validation")
  )
