"""``benchmarks/bench_demo.py`` reads the numbers ``make demo`` prints (the run itself is a benchmark, not a test)."""

from __future__ import annotations

from benchmarks.bench_demo import parse_demo_output

OUTPUT = """\
  split train            1346
  seconds crops          1.2900
training done
  steps               315
  images/s            91.8971
  seconds             219.3757
  monitor rank1       0.6042
  monitor mAP         0.4491
eval: pets09 (cosine, flip, dense)
  rank1    45.11%
  mAP      34.03%
"""


def test_the_training_summary_and_the_test_scores_are_read_not_the_monitor_or_the_crops():
    assert parse_demo_output(OUTPUT) == {
        "train_steps": 315,
        "train_images_per_second": 91.8971,
        "train_seconds": 219.3757,
        "test_rank1_percent": 45.11,
        "test_mAP_percent": 34.03,
    }
    assert parse_demo_output("nothing printed")["test_rank1_percent"] is None
