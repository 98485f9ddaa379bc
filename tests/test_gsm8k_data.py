"""GSM8K through TFDS: the local-jsonl builder, TFDS's own builder (its download replaced by local
files), the examples the pipeline sees, and one-line errors for a bad local directory."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from dqo_jax.data import gsm8k_tfds, tasks
from dqo_jax.errors import UserError
from dqo_jax.rewards import grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "data", "gsm8k")
GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_strip_calculator_annotations():
  assert gsm8k_tfds.strip_calculator_annotations(GOLD) == (
      "Natalia sold 48/2 = 24 clips in May.\n"
      "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
  )
  assert gsm8k_tfds.strip_calculator_annotations("$<<12/60=0.2>>0.2 a minute") == "$0.2 a minute"
  assert gsm8k_tfds.strip_calculator_annotations("no annotation") == "no annotation"


def test_final_answer_and_reasoning_lines():
  assert gsm8k_tfds.final_answer(GOLD) == "72"
  assert gsm8k_tfds.final_answer("a\nb\n#### 1,080") == "1080"
  assert gsm8k_tfds.final_answer("x\n#### -3") == "-3"
  assert gsm8k_tfds.num_reasoning_lines(GOLD) == 2
  assert gsm8k_tfds.num_reasoning_lines("a\n\nb\nc\n#### 5") == 3
  with pytest.raises(ValueError):
    gsm8k_tfds.final_answer("no final line")


def _rows(path, n):
  with open(path) as f:
    return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture
def small_gsm8k(tmp_path):
  """The first 40 train and 12 test records of data/gsm8k, in a directory of their own."""
  src = tmp_path / "gsm8k_src"
  src.mkdir()
  rows = {}
  for split, n in (("train", 40), ("test", 12)):
    rows[split] = _rows(os.path.join(GSM8K, f"{split}.jsonl"), n)
    (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
  return src, rows


def test_local_builder_round_trip_and_reuse(small_gsm8k, tmp_path, monkeypatch):
  src, rows = small_gsm8k
  data = gsm8k_tfds.load_gsm8k(tmp_path / "data", str(src))
  for split in ("train", "test"):
    assert len(data[split]) == len(rows[split])
    key = lambda r: (r["question"], r["answer"])  # noqa: E731
    assert sorted(map(key, data[split])) == sorted(map(key, rows[split]))
    for ex in data[split]:
      assert set(ex) == {"question", "answer", "final_answer"}
      assert ex["final_answer"] == ex["answer"].rsplit("####", 1)[1].strip().replace(",", "")

  builder = gsm8k_tfds.gsm8k_builder(tmp_path / "data", str(src))
  assert set(builder.info.features) == {
      "question",
      "answer",
      "annotation",
      "short_answer",
      "final_answer",
  }
  # TFDS's gsm8k features, with the same meaning.
  raw = next(iter(builder.as_data_source("train")))
  assert (
      raw["annotation"].decode() + "#### " + raw["short_answer"].decode() == raw["answer"].decode()
  )

  def fail(*args, **kwargs):
    raise AssertionError("dataset regenerated on second call")

  monkeypatch.setattr(gsm8k_tfds.Gsm8kLocal, "_generate_examples", fail)
  assert gsm8k_tfds.load_gsm8k(tmp_path / "data", str(src)) == data


def test_changed_local_copy_is_prepared_again(small_gsm8k, tmp_path):
  src, rows = small_gsm8k
  gsm8k_tfds.load_gsm8k(tmp_path / "data", str(src))
  (src / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["test"][:5]))
  assert len(gsm8k_tfds.load_gsm8k(tmp_path / "data", str(src))["test"]) == 5
  assert len(list((tmp_path / "data" / "gsm8k_local").iterdir())) == 2


def test_tfds_gsm8k_builder_without_network(small_gsm8k, tmp_path, monkeypatch):
  """local_dir="" goes through TFDS's own gsm8k builder; its download is replaced by the files."""
  src, rows = small_gsm8k
  seen = {}

  def download_and_extract(self, urls):
    seen.update(urls)
    return {k: str(src / ("test.jsonl" if "test" in k else "train.jsonl")) for k in urls}

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
  data = gsm8k_tfds.load_gsm8k(tmp_path / "data", "")
  assert seen["train"].startswith("https://raw.githubusercontent.com/openai/grade-school-math/")
  assert os.path.isdir(tmp_path / "data" / "gsm8k")
  local = gsm8k_tfds.load_gsm8k(tmp_path / "local", str(src))
  for split in ("train", "test"):
    key = lambda r: (r["question"], r["answer"], r["final_answer"])  # noqa: E731
    assert sorted(map(key, data[split])) == sorted(map(key, local[split]))


def test_task_examples(small_gsm8k, tmp_path):
  src, _ = small_gsm8k
  config = _config(local_dir=str(src), num_train=30)
  task = tasks.load_task(config, str(tmp_path))
  assert task.name == "gsm8k"
  assert len(task.splits["train"]) == 30 and len(task.splits["test"]) == 12
  for ex in task.splits["train"] + task.splits["test"]:
    assert "<<" not in ex["solution"] and ">>" not in ex["solution"]
    assert ex["solution"].endswith(f"#### {ex['gold_answer'].rsplit('#### ', 1)[1]}")
    assert ex["num_steps"] == len(ex["solution"].split("####")[0].strip().splitlines()) >= 1
    # The SFT target is a correct answer, and it is also the reference the grader reads.
    assert grade("gsm8k", ex["solution"], ex["gold_answer"]).correct
    assert grade("gsm8k", f"so\n#### {ex['answer']}", ex["solution"]).correct
  tok = tasks.load_tokenizer(config, task)
  assert tok.vocab_size <= 300
  text = task.splits["train"][0]["solution"]
  assert tok.decode(tok.encode(text)) == text


def _config(**data):
  import ml_collections

  return ml_collections.ConfigDict(
      dict(
          data=dict(dict(task="gsm8k", dir="", local_dir="", num_train=-1, num_test=-1), **data),
          tokenizer=dict(vocab_size=300),
          model=dict(d_model=8),
      )
  )


def test_bad_local_dir_names_the_fix(tmp_path):
  with pytest.raises(UserError, match=r"no such directory; pass --config.data.local_dir=DIR"):
    gsm8k_tfds.load_gsm8k(tmp_path / "data", str(tmp_path / "nowhere"))
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "test.jsonl").write_text("")
  with pytest.raises(UserError, match=r"has no train.jsonl; pass --config.data.local_dir=DIR") as e:
    gsm8k_tfds.load_gsm8k(tmp_path / "data", str(tmp_path / "src"))
  assert "\n" not in str(e.value)


def test_malformed_record_names_file_and_line(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  good = json.dumps(dict(question="q?", answer="1+1=2\n#### 2"))
  (src / "train.jsonl").write_text(good + "\n" + json.dumps(dict(question="q?")) + "\n")
  (src / "test.jsonl").write_text(good + "\n")
  with pytest.raises(UserError, match=r"train.jsonl:2: not a GSM8K record"):
    gsm8k_tfds.load_gsm8k(tmp_path / "data", str(src))
