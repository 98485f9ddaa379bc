"""Tests for the SentencePiece tokenizer."""

import os

import numpy as np
import pytest

from dqo_jax.data import arith
from dqo_jax.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    load_or_train_tokenizer,
    train_sentencepiece,
)


def _texts(problems):
  return [text for p in problems for text in (p.question, p.solution)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "arith.model"
  train_sentencepiece(_texts(arith.generate_split(0, 300)), path, vocab_size=256)
  return path


@pytest.fixture(scope="module")
def tokenizer(model_path) -> Tokenizer:
  return SentencePieceTokenizer(model_path)


@pytest.fixture(scope="module")
def held_out():
  return arith.generate_split(12345, 200)


def test_special_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  assert tokenizer.pad_id != tokenizer.eos_id
  assert 100 < tokenizer.vocab_size <= 256


def test_round_trip_on_held_out_problems(tokenizer, held_out):
  for text in _texts(held_out):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert not {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} & set(ids)
    assert tokenizer.decode(ids) == text


def test_newlines_and_answer_marker_survive(tokenizer):
  solution = "12+7=19\n19-5=14\n14*2=28\n#### 28"
  assert tokenizer.decode(tokenizer.encode(solution)) == solution
  newline_ids = tokenizer.encode("\n")
  assert len(newline_ids) == 1 and newline_ids[0] in tokenizer.encode(solution)


def test_concatenated_encodings_decode_to_concatenated_text(tokenizer, held_out):
  for p in held_out[:50]:
    prompt, completion = p.question + "\n", p.solution
    ids = tokenizer.encode(prompt) + tokenizer.encode(completion)
    assert tokenizer.decode(ids) == prompt + completion


def test_decode_skips_special_ids_and_accepts_numpy(tokenizer):
  ids = tokenizer.encode("#### 42")
  padded = [tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]
  assert tokenizer.decode(np.asarray(padded, dtype=np.int32)) == "#### 42"


def test_training_is_deterministic_and_reload_matches(tmp_path, model_path, tokenizer, held_out):
  retrained = train_sentencepiece(
      _texts(arith.generate_split(0, 300)), tmp_path / "again.model", vocab_size=256
  )
  assert (tmp_path / "again.model").read_bytes() == model_path.read_bytes()
  reloaded = SentencePieceTokenizer(model_path)
  for text in _texts(held_out[:20]):
    assert reloaded.encode(text) == tokenizer.encode(text) == retrained.encode(text)
  # No temp files left beside the model.
  assert os.listdir(tmp_path) == ["again.model"]


def test_load_or_train_trains_once(tmp_path):
  path = tmp_path / "sub" / "tok.model"
  calls = []

  def texts_fn():
    calls.append(1)
    return _texts(arith.generate_split(0, 100))

  first = load_or_train_tokenizer(path, texts_fn, vocab_size=128)
  second = load_or_train_tokenizer(path, texts_fn, vocab_size=128)
  assert len(calls) == 1
  assert first.vocab_size == second.vocab_size <= 128
  assert second.encode("Mia has 3 coins.") == first.encode("Mia has 3 coins.")
