"""The project's single tokenizer interface and its implementations.

Everything that turns text into ids goes through `Tokenizer`. Backends:
  * `SentencePieceTokenizer`: the embedded task's own model (strict special ids);
  * `PretrainedSentencePiece`: a pretrained SentencePiece `.model` (Llama 2, Gemma);
  * `HFTokenizer`: a Hugging Face `tokenizer.json` through the `tokenizers` package (Qwen2,
    Llama 3, and Llama 2 / Gemma directories that ship one).
`load_tokenizer(path)` picks the backend for a model directory. Chat templates (Qwen's ChatML,
Gemma's turns, Llama 3's headers) are rendered in Python by `dqo_jax.chat_templates`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Protocol

import sentencepiece as spm

from dqo_jax import chat_templates

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "PretrainedSentencePiece",
    "HFTokenizer",
    "load_tokenizer",
    "train_sentencepiece",
    "load_or_train_tokenizer",
]

# Fixed special ids so that every model trained here agrees on them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
  """Text <-> token ids. `pad_id` is always distinct from `eos_id`.

  `add_bos`: whether a prompt starts with `bos_id` (False for Qwen, which has no BOS).
  `stop_ids`: every id that ends generation, `eos_id` first.
  """

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  add_bos: bool
  stop_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]:
    """Ids for `text`, with no BOS/EOS added."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """Text for `ids`, skipping pad/bos/eos wherever they occur."""
    ...


class SentencePieceTokenizer:
  """`Tokenizer` backed by a SentencePiece model file."""

  add_bos = True

  def __init__(self, model_path: str | os.PathLike):
    self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_path))
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    # Batching pads with pad_id and stops on eos_id; a model lacking either,
    # or sharing them, would silently corrupt both.
    specials = (self.bos_id, self.eos_id, self.pad_id)
    if min(specials) < 0 or self.pad_id == self.eos_id:
      raise ValueError(
          f"{model_path}: need distinct, defined pad/eos and a bos id, got "
          f"pad={self.pad_id} eos={self.eos_id} bos={self.bos_id}"
      )
    self.stop_ids = (self.eos_id,)
    self._skip = frozenset(specials)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    # int() also accepts numpy / jax integer scalars.
    return self._sp.decode([int(i) for i in ids if int(i) not in self._skip])


def train_sentencepiece(
    texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 256
) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model on `texts` and writes it to `model_path`.

  Training is in-process and deterministic. The model is exact on this
  project's text: decode(encode(s)) == s, newlines included, and since no
  dummy-prefix space is inserted, encode(a) + encode(b) decodes to a + b
  (prompt and completion can be tokenized separately). `vocab_size` is an
  upper bound: a corpus with a small vocabulary yields fewer pieces.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      # BPE rather than unigram: on a small, templated corpus unigram cannot
      # find enough pieces and segments common words oddly.
      model_type="bpe",
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      # Solutions are one step per line, so "\n" must survive as a piece.
      user_defined_symbols=["\n"],
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      # Per-digit pieces keep the arithmetic learnable and the vocab small.
      split_digits=True,
      byte_fallback=False,
      character_coverage=1.0,
      # One thread keeps the result independent of scheduling.
      num_threads=1,
      minloglevel=2,
  )
  _write_atomically(model_path, model.getvalue())
  return SentencePieceTokenizer(model_path)


def _write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes via a temp file and rename, so readers never see a partial model."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


def load_or_train_tokenizer(
    model_path: str | os.PathLike,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int = 256,
) -> SentencePieceTokenizer:
  """Loads the model at `model_path`, training it from `texts_fn()` if absent.

  `texts_fn` is only called when training is needed, so callers can defer
  building the corpus.
  """
  if os.path.exists(model_path):
    return SentencePieceTokenizer(model_path)
  return train_sentencepiece(texts_fn(), model_path, vocab_size)


# ----------------------------------------------------------------------------------------------
# Pretrained tokenizers (Hugging Face model directories).

_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<|fim_pad|>",  # Qwen2.5
    "<pad>",
    "[PAD]",
    "<|pad|>",
    "<|reserved_special_token_0|>",  # Llama 3.0
)


def _token_str(tok) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(tok, dict):
    return tok.get("content")
  return tok


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


class _SpecialTokens:
  """What a model directory says about special tokens, EOS and the chat template.

  Choices (docs/models.md):
    * eos_id: the end-of-turn token of the chat template when there is one (`<|im_end|>`,
      `<|eot_id|>`, `<end_of_turn>`): what an instruct model emits to end its answer; otherwise
      the tokenizer's eos token. `stop_ids` lists every id that ends generation.
    * pad_id: the tokenizer's pad token if it differs from eos_id; else the first present of
      `_PAD_CANDIDATES`, else unk. Pads are masked everywhere, so any id distinct from eos works;
      Qwen's pad `<|endoftext|>` is kept unless it is also the eos (base Qwen2.5), Llama 3 (no pad)
      gets `<|finetune_right_pad_id|>` (3.1+) or `<|reserved_special_token_0|>` (3.0).
  """

  def __init__(self, directory: str, lookup, default_bos: bool, defaults=None):
    """`defaults`: {"bos_token": id, ...} for keys tokenizer_config.json leaves out."""
    cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
    cfg = _read_json(os.path.join(directory, "special_tokens_map.json")) | cfg
    gen = _read_json(os.path.join(directory, "generation_config.json"))
    self.template = chat_templates.read_template(directory, cfg)
    defaults = defaults or {}
    name = lambda key: _token_str(cfg.get(key))
    ident = lambda key: defaults.get(key) if name(key) is None else lookup(name(key))
    self.bos_id, self.unk_id = ident("bos_token"), ident("unk_token")
    eos = ident("eos_token")
    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos is None and gen_eos:
      eos = gen_eos[0]
    turn_end = None
    if self.template is not None:
      turn_end = lookup(self.template.end_of_turn)
    self.eos_id = turn_end if turn_end is not None else eos
    if self.eos_id is None:
      raise ValueError(f"{directory}: no eos token in tokenizer_config.json or generation_config")
    self.stop_ids = tuple(dict.fromkeys(i for i in [self.eos_id, eos, *gen_eos] if i is not None))
    pad = ident("pad_token")
    if pad is None or pad == self.eos_id:
      pad = next((lookup(t) for t in _PAD_CANDIDATES if lookup(t) not in (None, self.eos_id)), None)
    if pad is None and self.unk_id not in (None, self.eos_id):
      pad = self.unk_id
    if pad is None:
      raise ValueError(f"{directory}: no token to pad with that differs from eos")
    self.pad_id = pad
    self.add_bos = bool(cfg.get("add_bos_token", default_bos)) and self.bos_id is not None
    if self.bos_id is None:  # Qwen: no BOS; the protocol still wants an id, never prepended
      self.bos_id = self.pad_id


class _ChatMixin:
  template: "chat_templates.ChatTemplate | None"

  def apply_chat_template(
      self, messages: list[dict[str, str]], add_generation_prompt: bool = True
  ) -> str:
    """The prompt text for `messages` ({"role", "content"}), as `transformers` renders it."""
    if self.template is None:
      raise ValueError("this tokenizer has no chat template (a base model?)")
    return self.template.render(messages, add_generation_prompt, bos_token=self._bos_text)

  def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
    """Ids of the rendered chat; BOS, when the family has one, is part of the template."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class HFTokenizer(_ChatMixin):
  """`Tokenizer` over a Hugging Face `tokenizer.json` (the `tokenizers` package, no transformers).

  `encode` parses special-token strings in the text (as `transformers` does), so a rendered
  chat template encodes to the ids `apply_chat_template(tokenize=True)` gives.
  """

  def __init__(self, directory: str | os.PathLike):
    import tokenizers  # pylint: disable=g-import-not-at-top

    directory = os.fspath(directory)
    self._tok = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    # Does the post-processor put a BOS in front (Llama 3) or not (Qwen)?
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
    sp = _SpecialTokens(directory, self._tok.token_to_id, default_bos=bool(prefix))
    if prefix and prefix != [sp.bos_id]:
      sp.add_bos = False
    self.bos_id, self.eos_id, self.pad_id = sp.bos_id, sp.eos_id, sp.pad_id
    self.add_bos, self.stop_ids, self.template = sp.add_bos, sp.stop_ids, sp.template
    self._bos_text = self._tok.id_to_token(self.bos_id)
    self._skip = frozenset(
        {self.bos_id, self.eos_id, self.pad_id, *self.stop_ids}
        | {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    )

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text without the special tokens, as `decode(skip_special_tokens=True)`."""
    return self._tok.decode([int(i) for i in ids if int(i) not in self._skip])


class PretrainedSentencePiece(_ChatMixin):
  """`Tokenizer` over a pretrained SentencePiece `.model` (Llama 2, Gemma).

  Special-token strings in the text (e.g. `<bos>` in a rendered Gemma chat) are split out and
  mapped to their ids; the pieces between them are encoded by SentencePiece.
  """

  def __init__(self, model_file: str | os.PathLike):
    model_file = os.fspath(model_file)
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self._sp.get_piece_size()
    specials = {
        self._sp.id_to_piece(i): i
        for i in range(self.vocab_size)
        if self._sp.is_control(i) or self._sp.is_unknown(i)
    }
    lookup = lambda piece: specials[piece] if piece in specials else _piece_id(self._sp, piece)
    # The model's own ids stand in for what tokenizer_config.json (if any) does not name.
    own = dict(
        bos_token=self._sp.bos_id(),
        eos_token=self._sp.eos_id(),
        pad_token=self._sp.pad_id(),
        unk_token=self._sp.unk_id(),
    )
    own = {k: v for k, v in own.items() if v >= 0}
    sp = _SpecialTokens(os.path.dirname(model_file), lookup, default_bos=True, defaults=own)
    self.bos_id, self.eos_id, self.pad_id = sp.bos_id, sp.eos_id, sp.pad_id
    self.add_bos, self.stop_ids, self.template = sp.add_bos, sp.stop_ids, sp.template
    self._bos_text = self._sp.id_to_piece(self.bos_id)
    self._special_ids = dict(specials)
    pattern = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True))
    self._split = re.compile(f"({pattern})") if pattern else None
    self._skip = frozenset(
        {self.bos_id, self.eos_id, self.pad_id, *self.stop_ids, *specials.values()}
    )

  def encode(self, text: str) -> list[int]:
    if self._split is None:
      return self._sp.encode(text)
    out: list[int] = []
    for i, part in enumerate(self._split.split(text)):
      if i % 2:
        out.append(self._special_ids[part])
      elif part:
        out.extend(self._sp.encode(part))
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) not in self._skip])


def _piece_id(sp, piece: str) -> int | None:
  i = sp.piece_to_id(piece)
  return None if i == sp.unk_id() and piece != sp.id_to_piece(i) else i


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | PretrainedSentencePiece:
  """The tokenizer of a model directory: `tokenizer.json` (what `transformers` itself uses) if
  present, else `tokenizer.model` (SentencePiece). Also accepts a `.model` file, or a directory
  written by `python -m dqo_jax.convert` (its files are under `hf/`)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return PretrainedSentencePiece(path)
  for d in (path, os.path.join(path, "hf")):
    if os.path.isfile(os.path.join(d, "tokenizer.json")):
      return HFTokenizer(d)
    if os.path.isfile(os.path.join(d, "tokenizer.model")):
      return PretrainedSentencePiece(os.path.join(d, "tokenizer.model"))
  raise FileNotFoundError(f"{path}: no tokenizer.json and no tokenizer.model")
