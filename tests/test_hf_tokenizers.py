"""Pretrained tokenizers and chat templates against `transformers`, on tiny tokenizers built here.

The templates below are the published ones of Qwen2.5-Instruct, Gemma(-2)-it, Llama-3-Instruct
and Llama-3.1-Instruct, less their tool-calling branches (not supported here).
"""

import io
import json

import pytest
import sentencepiece as spm

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dqo_jax.tokenizer import HFTokenizer, PretrainedSentencePiece, load_tokenizer  # noqa: E402

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 72.\nStep 1: 48 / 2 = 24.\tStep 2: 48 + 24 = 72.",
    "Ünïcödé façade, naïve café; 数学 问题",
] * 4
TEXTS = [
    "How many clips did Natalia sell?",
    "  two leading spaces and a trailing one ",
    "line one\nline two\n\n  indented",
    "Ünïcödé façade 数学 and unseen glyphs ☃ 🎉",
    "digits 1234567890 and $12.50",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [
        {"role": "system", "content": "  Answer briefly. "},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5\n"},
        {"role": "user", "content": " And times 4? "},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! "},
    ],
]


def _bpe(specials, bos=None):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS, trainer)
  if bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
  return tok


def _save_fast(tmp_path, tok, template, **special):
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  fast.chat_template = template
  fast.save_pretrained(tmp_path)
  return transformers.AutoTokenizer.from_pretrained(tmp_path)


def _sentencepiece(tmp_path, cls, template=None, config=None, **train):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS),
      model_writer=model,
      vocab_size=420,
      model_type="bpe",
      byte_fallback=True,
      hard_vocab_limit=False,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      character_coverage=1.0,
      num_threads=1,
      minloglevel=2,
      **train,
  )
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  config = {"tokenizer_class": cls, **(config or {})}
  if template:
    config["chat_template"] = template
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  return transformers.AutoTokenizer.from_pretrained(tmp_path)


def _same_as_transformers(ours, theirs, chats=CHATS):
  for text in TEXTS:
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    expected = theirs(text).input_ids  # with the family's BOS, if it has one
    assert ([ours.bos_id] if ours.add_bos else []) + ours.encode(text) == expected, text
    assert ours.decode(ours.encode(text)) == theirs.decode(expected, skip_special_tokens=True)
  for chat in chats:
    for gen in (True, False):
      rendered = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      assert ours.apply_chat_template(chat, add_generation_prompt=gen) == rendered
      ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
      ids = ids["input_ids"] if hasattr(ids, "keys") else ids
      assert ours.encode_chat(chat, add_generation_prompt=gen) == list(ids)


@pytest.mark.parametrize("template", [QWEN25, QWEN2], ids=["qwen2.5", "qwen2"])
def test_qwen_chatml(tmp_path, template):
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]
  theirs = _save_fast(
      tmp_path, _bpe(specials), template, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  ours = load_tokenizer(tmp_path)
  assert isinstance(ours, HFTokenizer) and not ours.add_bos
  assert ours.eos_id == theirs.convert_tokens_to_ids("<|im_end|>")
  assert ours.pad_id == theirs.convert_tokens_to_ids("<|endoftext|>") != ours.eos_id
  _same_as_transformers(ours, theirs)


def test_qwen_base_whose_pad_is_its_eos_pads_with_fim_pad(tmp_path):
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]
  theirs = _save_fast(
      tmp_path, _bpe(specials), None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
  )
  ours = load_tokenizer(tmp_path)
  assert ours.eos_id == theirs.convert_tokens_to_ids("<|endoftext|>")
  assert ours.pad_id == theirs.convert_tokens_to_ids("<|fim_pad|>")
  with pytest.raises(ValueError, match="no chat template"):
    ours.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("template", [LLAMA3, LLAMA31], ids=["llama3", "llama3.1"])
def test_llama3_headers(tmp_path, template):
  specials = [
      "<|begin_of_text|>",
      "<|end_of_text|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eot_id|>",
      "<|finetune_right_pad_id|>",
  ]
  tok = _bpe(specials, bos="<|begin_of_text|>")
  theirs = _save_fast(
      tmp_path, tok, template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
  )
  ours = load_tokenizer(tmp_path)
  assert ours.add_bos and ours.bos_id == theirs.bos_token_id
  assert ours.eos_id == theirs.convert_tokens_to_ids("<|eot_id|>")
  assert ours.pad_id == theirs.convert_tokens_to_ids("<|finetune_right_pad_id|>")
  _same_as_transformers(ours, theirs)
  # A chat-rendered prompt starts with the template's BOS; the pipeline adds no second one.
  from dqo_jax.data.batches import encode_prompt

  chat = lambda q: ours.apply_chat_template([{"role": "user", "content": q}])
  ids = encode_prompt(ours, "What is 2+2?", chat)
  assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


def test_gemma_sentencepiece_turns(tmp_path):
  theirs = _sentencepiece(
      tmp_path,
      "GemmaTokenizer",
      GEMMA,
      # As Gemma's own tokenizer_config.json says.
      dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True),
      pad_id=0,
      eos_id=1,
      bos_id=2,
      unk_id=3,
      pad_piece="<pad>",
      eos_piece="<eos>",
      bos_piece="<bos>",
      unk_piece="<unk>",
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
      add_dummy_prefix=False,
  )
  ours = load_tokenizer(tmp_path)
  assert isinstance(ours, PretrainedSentencePiece)
  assert (ours.pad_id, ours.bos_id) == (0, 2) and ours.add_bos
  assert ours.eos_id == ours._sp.piece_to_id("<end_of_turn>")  # the end of a model turn
  gemma_chats = [c for c in CHATS if c[0]["role"] != "system"]
  _same_as_transformers(ours, theirs, gemma_chats)
  with pytest.raises(ValueError, match="System role not supported"):
    ours.apply_chat_template(CHATS[1])


def test_llama2_sentencepiece_without_pad_pads_with_unk(tmp_path):
  theirs = _sentencepiece(
      tmp_path, "LlamaTokenizer", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True
  )
  ours = load_tokenizer(tmp_path / "tokenizer.model")
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
  for text in TEXTS:
    if text.startswith(" "):
      # transformers' converted tokenizer adds no dummy prefix before a leading space, while
      # SentencePiece (Meta's reference tokenizer, which this backend follows) does.
      assert ours.encode(text) == spm.SentencePieceProcessor(
          model_file=str(tmp_path / "tokenizer.model")
      ).encode(text)
      continue
    ids = theirs(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == ids, text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json and no tokenizer.model"):
    load_tokenizer(tmp_path)
