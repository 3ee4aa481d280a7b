"""What a run writes besides its checkpoint: metrics.jsonl is strict JSON whatever the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from reid_ssl.train.logs import MetricsLog, append_jsonl


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_not_nan_tokens(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    log.step(1, 0, math.nan, math.inf, 0.99, -math.inf, 0.0, {"pos_sim": math.nan})
    log.monitor(1, 0, {"rank1": math.nan})
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 2, "loss": 1.5})
    records = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] is None and records[0]["lr"] is None and records[0]["pos_sim"] is None
    assert records[1]["eval_rank1"] is None and records[2]["loss"] == 1.5
    log.close({"optim": {"lr": math.inf}})  # the loss curve and CSV cope with the nulls; config.json is strict
    assert _strict((tmp_path / "config.json").read_text()) == {"optim": {"lr": None}}
    assert (tmp_path / "metrics.csv").is_file()
