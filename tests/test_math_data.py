"""MATH from a local copy, in both layouts, on the made-up problems of data/math_made_up/."""

import json
import os
import shutil

import ml_collections
import pytest

from dqo_jax.data import math_tfds, tasks
from dqo_jax.errors import UserError
from dqo_jax.rewards import grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "data", "math_made_up")
HENDRYCKS = os.path.join(FIXTURES, "math_hendrycks")
MATH500 = os.path.join(FIXTURES, "math500")
FIELDS = {"problem", "solution", "answer", "level", "subject", "unique_id"}


def test_parse_level():
  assert [math_tfds.parse_level(x) for x in ("Level 3", 5, "2", "Level ?", "", None)] == [
      3,
      5,
      2,
      0,
      0,
      0,
  ]


@pytest.mark.parametrize("layout", [HENDRYCKS, MATH500])
def test_both_layouts_give_the_same_examples(layout, tmp_path):
  data = math_tfds.load_math(tmp_path / "data", layout)
  assert {s: len(v) for s, v in data.items()} == {"train": 16, "test": 8}
  for split, examples in data.items():
    for ex in examples:
      assert set(ex) == FIELDS
      assert ex["unique_id"].startswith(f"{split}/") and ex["unique_id"].endswith(".json")
      assert 0 <= ex["level"] <= 5 and ex["subject"]
      assert "\\boxed" in ex["solution"]
  by_id = {ex["unique_id"]: ex for ex in data["train"]}
  assert by_id["train/prealgebra/9008.json"]["level"] == 0  # "Level ?"
  assert by_id["train/counting_and_probability/9015.json"]["subject"] == "Counting & Probability"
  other = math_tfds.load_math(tmp_path / "other", MATH500 if layout == HENDRYCKS else HENDRYCKS)
  for split in data:
    key = lambda ex: (ex["unique_id"], ex["problem"], ex["solution"], ex["level"], ex["subject"])  # noqa: E731
    assert sorted(map(key, data[split])) == sorted(map(key, other[split]))


def test_fixture_answers_grade_as_correct(tmp_path):
  data = math_tfds.load_math(tmp_path / "data", HENDRYCKS)
  for ex in data["train"] + data["test"]:
    assert grade("math", ex["solution"], ex["solution"]).correct, ex["unique_id"]
    assert grade("math", f"so $\\boxed{{{ex['answer']}}}$", ex["solution"]).correct


def test_prepared_once_and_reread(tmp_path, monkeypatch):
  data = math_tfds.load_math(tmp_path / "data", HENDRYCKS)

  def fail(*args, **kwargs):
    raise AssertionError("dataset regenerated on second call")

  monkeypatch.setattr(math_tfds.MathLocal, "_generate_examples", fail)
  assert math_tfds.load_math(tmp_path / "data", HENDRYCKS) == data


def test_mixed_layouts_and_records_without_a_box(tmp_path):
  """Hendrycks train directory beside a MATH-500-style test.jsonl; the jsonl wins for test."""
  src = tmp_path / "src"
  shutil.copytree(os.path.join(HENDRYCKS, "train"), src / "train")
  shutil.copytree(os.path.join(HENDRYCKS, "test"), src / "test")  # ignored: test.jsonl wins
  rows = [
      dict(problem="What is 2+2?", solution="Two and two make 4.", answer="4", level=1),
      dict(problem="Name it.", solution="No answer anywhere.", subject="Algebra", level="Level 2"),
      dict(problem="What is 3+3?", solution="$\\boxed{6}$", answer="", subject="Algebra"),
  ]
  (src / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = math_tfds.load_math(tmp_path / "data", str(src))
  assert len(data["train"]) == 16
  test = sorted(data["test"], key=lambda ex: ex["problem"])
  assert [ex["answer"] for ex in test] == ["4", "6"]  # the record with no answer is skipped
  assert test[0]["solution"] == "Two and two make 4.\nThe final answer is $\\boxed{4}$."
  assert test[0]["unique_id"] == "test.jsonl:1" and test[0]["level"] == 1
  assert grade("math", "$\\boxed{4}$", test[0]["solution"]).correct


def _config(**data):
  return ml_collections.ConfigDict(
      dict(
          data=dict(
              dict(task="math", dir="", local_dir=HENDRYCKS, num_train=-1, num_test=-1), **data
          ),
          tokenizer=dict(vocab_size=256),
          model=dict(d_model=8),
      )
  )


def test_task_examples_group_by_level(tmp_path):
  config = _config(num_test=5)
  task = tasks.load_task(config, str(tmp_path))
  assert len(task.splits["train"]) == 16 and len(task.splits["test"]) == 5
  for ex in task.splits["train"] + task.splits["test"]:
    assert ex["num_steps"] == ex["level"]
    assert {"question", "solution", "answer", "subject", "unique_id"} <= set(ex)
  tok = tasks.load_tokenizer(config, task)
  text = task.splits["train"][5]["solution"]
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "local_dir, expected",
    [
        ("", "MATH needs --config.data.local_dir=DIR"),
        ("/nonexistent/math", "no such directory; pass --config.data.local_dir=DIR"),
        (FIXTURES, "has neither train.jsonl nor train/<subject>/<id>.json"),
    ],
)
def test_missing_data_names_the_fix_and_where_to_get_math(tmp_path, local_dir, expected):
  with pytest.raises(UserError) as e:
    tasks.load_task(_config(local_dir=local_dir), str(tmp_path))
  assert expected in str(e.value) and "github.com/hendrycks/math" in str(e.value)
  assert "\n" not in str(e.value)


def test_not_json_names_the_file(tmp_path):
  src = tmp_path / "src"
  shutil.copytree(os.path.join(HENDRYCKS, "train"), src / "train")
  (src / "test.jsonl").write_text('{"problem": "x", "solution": "\\\\boxed{1}"}\nnot json\n')
  with pytest.raises(UserError, match=r"test.jsonl:2: not JSON"):
    math_tfds.load_math(tmp_path / "data", str(src))
