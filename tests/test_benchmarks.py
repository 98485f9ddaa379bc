"""`python -m benchmarks.run`'s row functions at tiny sizes: they run and fill every column.
No timing is asserted (the machine is shared); MATH fixtures grade as they say they do."""

import json

import pytest

from benchmarks import attention, grading, lora, padding, returns, run, train_steps
from dqo_jax.rewards import grade_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # donation on CPU


def _check(rows):
  assert rows
  for r in rows:
    assert tuple(r) == run.COLUMNS
    assert r["met"] in (None, True, False)
    assert r["ours"] is not None and r["ours"] > 0, r
    if r["target"] is None:
      assert r["met"] is None
  json.dumps(rows, default=float)


@pytest.mark.parametrize(
    "rows_fn",
    [
        lambda: train_steps.rows(True, size="tiny"),
        lambda: lora.rows(True, size="tiny"),
        lambda: attention.rows(True, lengths=(16,)),
        lambda: returns.rows(True),
        lambda: padding.rows(True),
        lambda: grading.rows(True),
    ],
    ids=["train_steps", "lora", "attention", "returns", "padding", "grading"],
)
def test_rows(rows_fn):
  _check(rows_fn())


def test_run_collects_the_rows_of_the_modules_it_is_given():
  rows = run.collect(True, modules=("padding",))
  assert rows and all(r["name"].startswith("padding") for r in rows)
  table = run.markdown(rows).splitlines()
  assert table[0].startswith("| name | ours") and len(table) == 2 + len(rows)


@pytest.mark.parametrize("cases", [grading.MATH_TYPICAL, grading.MATH_SYMBOLIC])
def test_math_fixtures_grade_as_labelled(cases):
  grades = grade_batch("math", [c[0] for c in cases], [c[1] for c in cases])
  assert [g.correct for g in grades] == [c[2] for c in cases]


def test_regime_study_settings_name_real_starts_config_keys_and_methods():
  from benchmarks import regime_study
  from configs.arith import get_config
  from dqo_jax.compare import METHODS

  config = get_config()
  for name, (_, start, methods, overrides) in regime_study.SETTINGS.items():
    assert start in regime_study.STARTS, name
    for key in {**regime_study.REFERENCE, **regime_study.STARTS[start], **overrides}:
      node = config
      for part in key.split("."):
        assert part in node, f"{name}: config has no {key}"
        node = node[part]
    assert set(methods.split(",")) <= set(METHODS), name


def test_the_accelerator_script_runs_the_dqo_step_and_the_sampler_of_a_tiny_model():
  from benchmarks import gpu_step  # pylint: disable=g-import-not-at-top

  r = gpu_step.run("tiny", batch=2, prompt=16, response=16, steps=1, peak_tflops=1.0)
  assert r["flops_per_step"] > 0 and r["train_tokens_per_s"] > 0 and r["sample_tokens_per_s"] > 0
  assert 0 < r["mfu"] < 1  # a CPU core runs far below a made-up 1 TFLOP/s peak
