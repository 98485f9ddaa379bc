"""LoRA adapters exported in PEFT's layout load with `peft` over the `transformers` model and give
our adapted model's logits; a PEFT adapter imports back; adapters trained in turn export as one.

Tiny random Llama and Qwen2 models are built with `transformers` on the CPU build of torch."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dqo_jax import convert, lora  # noqa: E402
from dqo_jax.checkpoint import Checkpoints  # noqa: E402
from dqo_jax.model import Transformer  # noqa: E402
from dqo_jax.peft_format import export_peft, import_peft  # noqa: E402
from dqo_jax.train.policy_value_step import PolicyValueState  # noqa: E402
from dqo_jax.train.state import TrainState  # noqa: E402

torch.set_num_threads(1)

VOCAB = 96
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  cls, extra = FAMILIES[request.param]
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(
      getattr(transformers, cls)(**SMALL, **extra), attn_implementation="eager"
  )
  path = tmp_path_factory.mktemp(request.param)
  hf.float().eval().save_pretrained(path, safe_serialization=True)
  cfg, boxed = convert.import_hf(path)
  return path, cfg, nn.meta.unbox(boxed)


def _adapters(cfg, base, rank, targets, seed):
  """Adapters of `rank` with A and B both random (B is zero only at initialisation)."""
  lora_cfg = ml_collections.ConfigDict(dict(rank=rank, alpha=2.0 * rank, targets=targets))
  model = lora.adapt(Transformer(cfg), lora_cfg)
  t = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(seed), t, jnp.ones_like(t))["params"])
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(
      lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32), lora.split(params)[1]
  )
  return adapters, lora_cfg


def _tokens():
  rng = np.random.default_rng(0)
  return rng.integers(3, VOCAB, (2, 10)).astype(np.int32)


def _ours(cfg, params, tokens, lora_cfg=None):
  model = Transformer(cfg) if lora_cfg is None else lora.adapt(Transformer(cfg), lora_cfg)
  logits, _ = model.apply({"params": params}, tokens, np.ones_like(tokens))
  return np.asarray(logits)


def _peft_logits(path, adapter_dir, tokens):
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(hf.float().eval(), adapter_dir)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def test_an_exported_adapter_loads_with_peft_and_gives_our_logits(family, tmp_path):
  path, cfg, base = family
  adapters, lora_cfg = _adapters(cfg, base, 4, "q,k,v,o,gate,up,down", seed=1)
  tokens = _tokens()
  ours = _ours(cfg, lora.merge(base, adapters), tokens, lora_cfg)
  assert np.abs(ours - _ours(cfg, base, tokens)).max() > 1e-2  # the adapters matter
  export_peft([(adapters, lora_cfg)], cfg, tmp_path / "adapter", base_model=str(path))
  theirs = _peft_logits(path, tmp_path / "adapter", tokens)
  assert np.abs(ours - theirs).max() <= 1e-4
  # ... and reads back into the same adapted model
  back, back_cfg = import_peft(tmp_path / "adapter", cfg)
  back_cfg = ml_collections.ConfigDict(back_cfg)
  np.testing.assert_allclose(
      _ours(cfg, lora.merge(base, back), tokens, back_cfg), ours, atol=1e-5, rtol=0
  )


def test_adapters_trained_in_turn_export_as_one(family, tmp_path):
  """SFT adapters of rank 4 on every projection, then DQO's of rank 2 on q and v over the folded
  SFT policy: one PEFT adapter of rank 6 (zero-padded where only the first adapted)."""
  path, cfg, base = family
  first, first_cfg = _adapters(cfg, base, 4, "q,k,v,o,gate,up,down", seed=2)
  sft = lora.fold(lora.merge(base, first), first_cfg)
  second, second_cfg = _adapters(cfg, sft, 2, "q,v", seed=3)
  tokens = _tokens()
  ours = _ours(cfg, lora.fold(lora.merge(sft, second), second_cfg), tokens)
  export_peft([(first, first_cfg), (second, second_cfg)], cfg, tmp_path / "adapter")
  assert np.abs(ours - _peft_logits(path, tmp_path / "adapter", tokens)).max() <= 1e-4


def _save_run(workdir, run, state, lora_cfg):
  """What a LoRA run leaves: its config.json and a checkpoint of its state."""
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(dict(model=dict(lora=lora_cfg.to_dict()))))
  ckpt = Checkpoints(workdir / run / "checkpoints", every=1)
  assert ckpt.save(1, state, force=True)
  ckpt.close()


def test_the_cli_exports_the_adapters_of_a_workdir_merged_and_as_peft(family, tmp_path):
  """SFT adapters (a policy-only state) then DQO adapters (a policy-value state) over OUR_DIR:
  --to_hf folds both, --to_peft stacks them; transformers and peft give our logits; --peft
  folds the PEFT adapter back into a directory of ours."""
  path, cfg, base = family
  ours_dir = tmp_path / "ours"
  assert convert.main(["--from_hf", str(path), "--to", str(ours_dir)]) == 0
  first, first_cfg = _adapters(cfg, base, 4, "q,k,v,o,gate,up,down", seed=4)
  sft = lora.fold(lora.merge(base, first), first_cfg)
  second, second_cfg = _adapters(cfg, sft, 2, "q,v", seed=5)
  tx = optax.sgd(0.1)
  sft_run, dqo_run = tmp_path / "sft_run", tmp_path / "dqo_run"
  _save_run(sft_run, "sft", TrainState.create(first, tx), first_cfg)
  head = dict(value_head=np.zeros(cfg.d_model, np.float32))
  state = PolicyValueState(policy=TrainState.create(second, tx), value=TrainState.create(head, tx))
  _save_run(dqo_run, "dqo", state, second_cfg)
  params = f"{sft_run}/sft/checkpoints,{dqo_run}/dqo/checkpoints"
  merged, adapter = tmp_path / "merged", tmp_path / "adapter"
  args = ["--from", str(ours_dir), "--params", params]
  assert convert.main(args + ["--to_hf", str(merged), "--dtype", "float32"]) == 0
  assert convert.main(args + ["--to_peft", str(adapter)]) == 0
  tokens = _tokens()
  ours = _ours(cfg, lora.fold(lora.merge(sft, second), second_cfg), tokens)
  hf = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
  with torch.no_grad():
    theirs = hf.float().eval()(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  assert np.abs(ours - _peft_logits(path, adapter, tokens)).max() <= 1e-4
  # The PEFT adapter folded back into OUR_DIR: a model directory for config.model.path.
  folded = tmp_path / "folded"
  assert convert.main(["--from", str(ours_dir), "--peft", str(adapter), "--to", str(folded)]) == 0
  _, params = convert.load_ours(folded)
  np.testing.assert_allclose(_ours(cfg, nn.meta.unbox(params), tokens), ours, atol=1e-4, rtol=0)


def test_the_merged_export_of_a_quantized_base_run_is_the_model_it_trained(family, tmp_path):
  """QLoRA (`base_qtype`): --to_hf folds the adapters into the base as the run read it,
  quantized, which is what the adapted model computed in training, not into the float base."""
  path, cfg, base = family
  ours_dir = tmp_path / "ours"
  assert convert.main(["--from_hf", str(path), "--to", str(ours_dir)]) == 0
  adapters, lora_cfg = _adapters(cfg, base, 4, "q,k,v,o,gate,up,down", seed=6)
  lora_cfg.base_qtype = "int8"
  _save_run(tmp_path / "run", "dqo", TrainState.create(adapters, optax.sgd(0.1)), lora_cfg)
  merged = tmp_path / "merged"
  params = str(tmp_path / "run" / "dqo" / "checkpoints")
  args = ["--from", str(ours_dir), "--params", params, "--to_hf", str(merged)]
  assert convert.main(args + ["--dtype", "float32"]) == 0
  tokens = _tokens()
  quantized = lora.quantize_base(Transformer(cfg), base, lora_cfg)
  trained = _ours(cfg, lora.merge(quantized, adapters), tokens, lora_cfg)
  hf = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
  with torch.no_grad():
    theirs = hf.float().eval()(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(trained - theirs).max() <= 1e-4
  over_float = _ours(cfg, lora.fold(lora.merge(base, adapters), lora_cfg), tokens)
  assert np.abs(over_float - theirs).max() > 1e-3  # the quantization shows


def test_a_peft_adapter_is_where_the_sft_stage_goes_on_training_from(family, tmp_path):
  """`model.lora.init_from`: the SFT stage's adapters start as the imported ones, over the model
  they were trained on, so that its policy starts at the PEFT model's logits; an adapter of
  another rank is refused with the settings that take it."""
  from configs.arith import get_config  # pylint: disable=g-import-not-at-top
  from dqo_jax import sharding  # pylint: disable=g-import-not-at-top
  from dqo_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from dqo_jax.stages.context import Context  # pylint: disable=g-import-not-at-top

  path, cfg, base = family
  adapters, lora_cfg = _adapters(cfg, base, 4, "q,v,down", seed=7)
  export_peft([(adapters, lora_cfg)], cfg, tmp_path / "adapter", base_model=str(path))
  config = get_config("tiny")
  config.model.path = str(path)
  # Exported adapters have lora_alpha = r (scale 1: B carries the scale), here 4.
  config.model.lora.update(
      rank=4, alpha=4.0, targets="q,v,down", init_from=str(tmp_path / "adapter")
  )
  lora.check(config)
  ctx = Context(config, str(tmp_path), None, None, None, sharding.make_mesh(config.mesh))
  step = ctx.sft_step()
  state = nn.meta.unbox(step.init_fn(jax.random.key(0)))
  tokens = _tokens()
  start = _ours(cfg, step.policy_params(state, ctx.sft_base(step)), tokens)
  assert np.abs(start - _peft_logits(path, tmp_path / "adapter", tokens)).max() <= 1e-4
  assert np.abs(start - _ours(cfg, base, tokens)).max() > 1e-2  # not the base model's
  config.model.lora.rank = 8
  ctx = Context(config, str(tmp_path), None, None, None, sharding.make_mesh(config.mesh))
  with pytest.raises(UserError, match="rank-4 adapter .* --config.model.lora.rank=4 "):
    ctx.sft_step().init_fn(jax.random.key(0))
