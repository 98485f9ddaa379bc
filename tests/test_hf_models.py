"""Parity with Hugging Face `transformers` for every family: logits, greedy decoding, export.

Tiny random models are built with `transformers` on the CPU build of torch, saved as safetensors
and imported; nothing is downloaded.
"""

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dqo_jax import convert, safetensors_io  # noqa: E402
from dqo_jax.model import ModelConfig, Transformer  # noqa: E402
from dqo_jax.sampler import generate  # noqa: E402
from dqo_jax.train import build  # noqa: E402

torch.set_num_threads(1)

VOCAB, PAD, EOS = 128, 0, 1
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=2,
    eos_token_id=EOS,
)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3.1": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(hidden_act="gelu_pytorch_tanh")),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=4,
            num_hidden_layers=4,
        ),
    ),
}


def _hf_model(name):
  cls, extra = FAMILIES[name]
  cfg = getattr(transformers, cls)(**(COMMON | extra))
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():  # larger than the init, so every mapping error shows
      p.add_(torch.randn_like(p) * 0.15)
  return model.float().eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  name = request.param
  hf = _hf_model(name)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path, safe_serialization=True)
  cfg, boxed = convert.import_hf(path)
  return name, hf, path, cfg, nn.meta.unbox(boxed)


def _batch(seed=0, b=3, length=12):
  rng = np.random.default_rng(seed)
  lengths = [length, length - 3, 5][:b]
  tokens = np.zeros((b, length), np.int32)
  mask = np.zeros((b, length), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, length - n :] = rng.integers(3, VOCAB, n)
    mask[i, length - n :] = 1
  return tokens, mask


def _hf_logits(hf, tokens, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = hf(
        input_ids=torch.from_numpy(tokens).long(),
        attention_mask=torch.from_numpy(mask).long(),
        position_ids=torch.from_numpy(positions).long(),
    )
  return out.logits.numpy()


def test_logits_match_transformers_with_padding(family):
  name, hf, _, cfg, params = family
  tokens, mask = _batch()
  ours, _ = Transformer(cfg).apply({"params": params}, tokens, mask)
  theirs = _hf_logits(hf, tokens, mask)
  valid = mask.astype(bool)
  diff = np.abs(np.asarray(ours)[valid] - theirs[valid]).max()
  assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"


def test_greedy_decoding_with_our_kv_cache_matches_transformers_generate(family):
  name, hf, _, cfg, params = family
  tokens, mask = _batch(seed=1, length=8)
  ours = generate(
      Transformer(cfg),
      params,
      tokens,
      mask,
      jax.random.key(0),
      max_new_tokens=16,
      eos_id=EOS,
      pad_id=PAD,
      greedy=True,
  )
  with torch.no_grad():
    theirs = hf.generate(
        input_ids=torch.from_numpy(tokens).long(),
        attention_mask=torch.from_numpy(mask).long(),
        max_new_tokens=16,
        min_new_tokens=16,  # never stop on EOS: 16 tokens of every row are compared
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, tokens.shape[1] :].numpy()
  ours_tokens = np.asarray(ours.tokens)
  for row in range(len(tokens)):
    n = int(ours.lengths[row])  # ours stops at EOS, which HF was told not to emit
    np.testing.assert_array_equal(ours_tokens[row, :n], theirs[row, :n], err_msg=name)
  assert ours_tokens.shape == (3, 16)


def test_round_trip_through_the_cli_loads_in_transformers(family, tmp_path):
  name, hf, path, _, _ = family
  ours, back = tmp_path / "ours", tmp_path / "back"
  assert convert.main(["--from_hf", str(path), "--to", str(ours)]) == 0
  tiny_shards = str(40_000 / (1 << 30))  # several shards, so the index is exercised
  args = ["--from", str(ours), "--to_hf", str(back), "--dtype", "float32"]
  assert convert.main(args + ["--max_shard_gb", tiny_shards]) == 0
  index = json.loads((back / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager")
  tokens, mask = _batch(seed=2)
  valid = mask.astype(bool)
  np.testing.assert_allclose(
      _hf_logits(reloaded.float().eval(), tokens, mask)[valid],
      _hf_logits(hf, tokens, mask)[valid],
      atol=1e-5,
      err_msg=name,
  )


def test_scanned_layers_import_and_export_as_the_per_layer_ones(family, tmp_path):
  """`model.scan_layers`: the checkpoint imports into stacked layers with the same logits, and
  a run's checkpoint of stacked layers exports to the same Hugging Face model."""
  from dqo_jax.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top

  name, hf, path, _, _ = family
  cfg, boxed = convert.load_pretrained_params(path, scan_layers=True)
  params = nn.meta.unbox(boxed)
  assert cfg.scan_layers and "layers" in params and "layer_0" not in params
  tokens, mask = _batch()
  ours, _ = Transformer(cfg).apply({"params": params}, tokens, mask)
  valid = mask.astype(bool)
  theirs = _hf_logits(hf, tokens, mask)
  assert np.abs(np.asarray(ours)[valid] - theirs[valid]).max() <= 1e-4, name
  ours_dir, back = tmp_path / "ours", tmp_path / "back"
  assert convert.main(["--from_hf", str(path), "--to", str(ours_dir)]) == 0
  ckpt = Checkpoints(tmp_path / "run" / "checkpoints", every=1)
  assert ckpt.save(1, {"params": params}, force=True)
  ckpt.close()
  args = ["--from", str(ours_dir), "--params", str(tmp_path / "run" / "checkpoints")]
  assert convert.main(args + ["--to_hf", str(back), "--dtype", "float32"]) == 0
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager")
  np.testing.assert_allclose(
      _hf_logits(reloaded.float().eval(), tokens, mask)[valid], theirs[valid], atol=1e-5
  )


def test_value_model_from_the_imported_trunk_starts_at_zero(family):
  """As the train stage builds it (`build.value_params_from`): the policy's trunk, a zero head."""
  _, _, _, cfg, params = family
  value = Transformer(cfg, head="value")
  tokens, mask = _batch()
  merged = nn.meta.unbox(build.value_params_from(value, params, jax.random.key(1)))
  assert "lm_head" not in merged and "value_head" in merged
  np.testing.assert_array_equal(
      merged["layer_0"]["attn"]["q"]["kernel"], params["layer_0"]["attn"]["q"]["kernel"]
  )
  v, _ = value.apply({"params": merged}, tokens, mask)
  assert v.shape == tokens.shape and not np.any(np.asarray(v))


def test_config_round_trips_through_config_json(family):
  _, hf, _, cfg, _ = family
  from dqo_jax.hf_config import hf_config_from_model_config, model_config_from_hf

  exported = hf_config_from_model_config(cfg, hf.config.to_dict())
  assert model_config_from_hf(exported) == cfg


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("llama", dict(qkv_bias=True), "cannot express model.o_bias=False"),
        ("llama", dict(sliding_window=4, layer_types=("global", "sliding")), "no sliding-window"),
        ("qwen2", dict(attn_softcap=30.0), "cannot express model.attn_softcap=30.0"),
        ("gemma", dict(norm_plus_one=False), "cannot express model.norm_plus_one=False"),
        ("mistral", {}, "export supports gemma, gemma2, llama, qwen2"),
    ],
)
def test_an_export_its_family_cannot_express_is_refused(family, change, message):
  from dqo_jax.hf_config import hf_config_from_model_config

  base = dict(qwen2=dict(qkv_bias=True), gemma=dict(norm_plus_one=True, embed_scale=True))
  cfg = ModelConfig(vocab_size=16, n_layers=2, family=family, **base.get(family, {}) | change)
  with pytest.raises(ValueError, match=re.escape(message)):
    hf_config_from_model_config(cfg)


def test_bfloat16_tensors_are_read_and_written_like_torch(tmp_path):
  from safetensors.torch import load_file, save_file

  t = torch.randn(3, 5).to(torch.bfloat16)
  save_file({"w": t}, tmp_path / "a.safetensors", metadata={"format": "pt"})
  ours = safetensors_io.SafetensorsFile(tmp_path / "a.safetensors").read("w")
  np.testing.assert_array_equal(ours.astype(np.float32), t.float().numpy())
  safetensors_io.write_file(
      tmp_path / "b.safetensors", [("w", ours.shape, ours.dtype, lambda: ours)]
  )
  assert torch.equal(load_file(tmp_path / "b.safetensors")["w"], t)


@pytest.fixture()
def llama_dir(tmp_path):
  hf = _hf_model("llama")
  hf.save_pretrained(tmp_path / "m", safe_serialization=True, max_shard_size="40KB")
  return tmp_path / "m"


def _error(capsys, out, *argv):
  assert convert.main([*argv, "--to", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  return err


def test_missing_or_incomplete_directories_give_one_line_errors(llama_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert "no such directory" in _error(capsys, out, "--from_hf", str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  assert "no config.json" in _error(capsys, out, "--from_hf", str(tmp_path / "empty"))
  index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[-1]
  data = (llama_dir / shard).read_bytes()
  (llama_dir / shard).unlink()
  err = _error(capsys, out, "--from_hf", str(llama_dir))
  assert "missing 1 of" in err and shard in err
  (llama_dir / shard).write_bytes(data)
  gone = "model.layers.1.mlp.up_proj.weight"
  del index["weight_map"][gone]
  (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
  assert "lacks 1 tensors: " + gone in _error(capsys, out, "--from_hf", str(llama_dir))
  empty = str(tmp_path / "empty")
  assert "no model_config.json" in _error(capsys, out, "--from", empty, "--to_hf", str(out))
  config = json.loads((llama_dir / "config.json").read_text()) | {"model_type": "mixtral"}
  (llama_dir / "config.json").write_text(json.dumps(config))
  err = _error(capsys, out, "--from_hf", str(llama_dir))
  assert "model_type='mixtral' is not supported" in err


def test_export_refuses_a_non_empty_directory_and_overwrite_replaces_the_weights(
    llama_dir, tmp_path, capsys
):
  """A sharded export over a single-file one used to keep both, and transformers loaded the
  old model.safetensors."""
  other = _hf_model("llama")
  with torch.no_grad():
    other.lm_head.weight.add_(1.0)
  other.save_pretrained(tmp_path / "other", safe_serialization=True)
  back = tmp_path / "back"
  for src, ours in ((llama_dir, "ours"), (tmp_path / "other", "ours_other")):
    assert convert.main(["--from_hf", str(src), "--to", str(tmp_path / ours)]) == 0
  export = lambda ours, *extra: convert.main(
      ["--from", str(tmp_path / ours), "--to_hf", str(back), "--dtype", "float32", *extra]
  )
  assert export("ours") == 0 and (back / "model.safetensors").exists()
  capsys.readouterr()
  sharded = ("--max_shard_gb", str(40_000 / (1 << 30)))
  assert export("ours_other", *sharded) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "is not empty" in err and "--overwrite" in err
  assert export("ours_other", *sharded, "--overwrite") == 0
  assert not (back / "model.safetensors").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager")
  assert torch.equal(reloaded.lm_head.weight, other.lm_head.weight)


def test_config_model_path_gives_the_stages_the_pretrained_policy(llama_dir, tmp_path):
  from configs.arith import get_config
  from dqo_jax import sharding
  from dqo_jax.stages.context import Context

  config = get_config("tiny")
  config.model.path = str(llama_dir)
  mesh = sharding.make_mesh(config.mesh)
  ctx = Context(config, str(tmp_path), None, None, None, mesh)
  cfg, boxed = convert.import_hf(llama_dir)
  assert ctx.model_cfg == cfg
  init_fn = ctx.sft_step().init_fn
  state = init_fn(jax.random.key(0))
  np.testing.assert_array_equal(
      nn.meta.unbox(state.params)["layer_1"]["mlp"]["up"]["kernel"],
      nn.meta.unbox(boxed)["layer_1"]["mlp"]["up"]["kernel"],
  )
  # With model.scan_layers (the pretrained presets' default) the stages get the layers stacked.
  config.model.scan_layers = True
  ctx = Context(config, str(tmp_path), None, None, None, mesh)
  assert ctx.model_cfg.scan_layers
  state = ctx.sft_step().init_fn(jax.random.key(0))
  np.testing.assert_array_equal(
      nn.meta.unbox(state.params)["layers"]["mlp"]["up"]["kernel"][1],
      nn.meta.unbox(boxed)["layer_1"]["mlp"]["up"]["kernel"],
  )


def test_a_bad_config_model_path_is_one_line_naming_what_is_missing(llama_dir, tmp_path):
  from configs.arith import get_config
  from dqo_jax.data.tasks import check_model_path
  from dqo_jax.errors import UserError

  config = get_config("tiny")
  config.model.path = str(tmp_path / "nope")
  with pytest.raises(UserError, match="nope: no such directory"):
    check_model_path(config)
  config.model.path = str(llama_dir)  # weights and config, but no tokenizer files
  with pytest.raises(UserError, match="no tokenizer.json and no tokenizer.model"):
    check_model_path(config)
