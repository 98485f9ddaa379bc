"""The reduced form of the fault-injection script (tests/fault_injection.py): an in-place damage
of the newest checkpoint of a killed run, then two runs started at once on a fresh workdir, on
the SFT stage of the tiny pipeline; neither may go unnoticed."""

import fault_injection

REDUCED = ("--config.stages=sft", "--config.sft.steps=8")


def test_killed_damaged_and_raced_runs_end_as_the_reference_or_refuse(tmp_path):
  tally = fault_injection.run(
      str(tmp_path),
      rounds=2,
      seed=0,
      overrides=REDUCED,
      plans=[("corrupt",), ("race",)],
  )
  assert tally.diverged == 0, "a run succeeded with parameters other than the reference's"
  assert tally.damage_missed == 0, "a damaged checkpoint was restored without a warning"
  assert not tally.race_errors, tally.race_errors
  assert tally.equal + len(tally.refused) == tally.rounds == 2
  assert tally.injected["corrupt"] == tally.damage_detected == 1
  assert tally.injected["race"] == tally.races_refused == 1
