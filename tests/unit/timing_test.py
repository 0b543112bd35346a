"""jaxpurify.timing: the seconds each stage reports, summed per stage in the order the stages ran, and the rest."""

import time

from jaxpurify import timing


def test_stages_in_order_their_seconds_summed_and_the_rest_counted_as_other():
  timing.start()
  timing.record("pretrain", compile_s=2.0, train_s=10.0)
  timing.record("attack", compile_s=1.0, train_s=5.0)
  timing.record("pretrain", train_s=3.0)  # a stage that reports twice (a resumed loop) adds up
  timing.record("evaluate", evaluate_s=4.0)
  time.sleep(0.01)
  times, line = timing.summary()
  assert times["stages"] == [{"stage": "pretrain", "compile_s": 2.0, "train_s": 13.0},
                             {"stage": "attack", "compile_s": 1.0, "train_s": 5.0},
                             {"stage": "evaluate", "evaluate_s": 4.0}]
  assert 0.01 <= times["total_s"] < 1.0 and times["other_s"] == times["total_s"] - 25.0
  assert line.startswith("time (compile + train per stage): pretrain 2.0 + 13.0 s, attack 1.0 + 5.0 s, "
                         "evaluate 4.0 s; other -")
  timing.start()
  assert timing.summary()[0]["stages"] == []
