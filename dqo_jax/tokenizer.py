"""The project's single tokenizer interface and its SentencePiece implementation.

Everything that turns text into ids goes through `Tokenizer`, so other
backends (e.g. Hugging Face tokenizers) can be swapped in behind it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Protocol

import sentencepiece as spm

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "train_sentencepiece",
    "load_or_train_tokenizer",
]

# Fixed special ids so that every model trained here agrees on them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
  """Text <-> token ids. `pad_id` is always distinct from `eos_id`."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Ids for `text`, with no BOS/EOS added."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """Text for `ids`, skipping pad/bos/eos wherever they occur."""
    ...


class SentencePieceTokenizer:
  """`Tokenizer` backed by a SentencePiece model file."""

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
