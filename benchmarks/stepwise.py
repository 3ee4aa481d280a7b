"""Scores every N optimizer steps of our trainer, without a second training loop.

:func:`reid_ssl.train.train` calls its monitor at the end of epochs; one epoch of the 60,000 Fashion-MNIST
training images is 468 steps, and the learning-efficiency experiment needs a point every ~100 steps. The
trainer already writes a checkpoint every ``train.checkpoint_every_steps``; :func:`score_on_save` wraps the
loop's checkpoint writer so that, **before** each checkpoint is written, a monitor scores the online backbone
the checkpoint holds and one line ``{"step": s, "epoch": e, ...scores}`` is appended to a JSON-lines file.

* Training is unchanged: the backbone is scored as a copy, and every RNG (Python, NumPy, torch) is restored
  afterwards, so a run with or without scores is the same run to the last bit (tests/benchmarks checks this).
* Interruptions lose nothing: a run killed after scoring step s but before its checkpoint resumes from the
  previous checkpoint and reaches step s again (the score is already there and is not recomputed).

A ``train.eval_every_steps`` key in the trainer would make this wrapper unnecessary.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.monitors import Monitor


def read_scores(path: Path) -> dict[int, dict[str, Any]]:
    """Step -> the last scores recorded for it (a re-scored step after a resume keeps the later line)."""
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r for r in records}


@contextlib.contextmanager
def score_on_save(monitor: Monitor, out_file: Path, flip: bool = False) -> Iterator[None]:
    """While active, every checkpoint :func:`reid_ssl.train.train` writes is scored first (module docstring).

    Args:
        monitor: takes an :class:`~reid_ssl.embedder.Embedder` of the checkpoint's backbone and preprocessing.
        out_file: the JSON-lines file the scores are appended to (steps already in it are not scored again).
        flip: the embedder's flip averaging (PETS09 retrieval: on; Fashion-MNIST: off).
    """
    from reid_ssl.checkpoint import BackgroundSaver
    from reid_ssl.embedder import Embedder
    from reid_ssl.models import build_backbone
    from reid_ssl.train.logs import append_jsonl
    from reid_ssl.train.state import rng_state, set_rng_state

    original = BackgroundSaver.save  # the loop's checkpoints: scored here, in the training thread, at save time
    done = set(read_scores(out_file))

    def save(self: BackgroundSaver, path: str | Path, payload: dict[str, Any]) -> None:
        step = int(payload["step"])
        if step not in done:
            state = rng_state()
            try:
                block = payload["backbone"]
                net = build_backbone(block["name"])
                net.load_state_dict(block["state_dict"])
                scores = monitor(Embedder(net, payload["preprocess"], block["sha256"], device=None, flip=flip))
            finally:
                set_rng_state(state)
            append_jsonl(out_file, {"step": step, "epoch": int(payload["epoch"]), **scores})
            done.add(step)
        original(self, path, payload)

    BackgroundSaver.save = save  # type: ignore[method-assign]
    try:
        yield
    finally:
        BackgroundSaver.save = original  # type: ignore[method-assign]
