"""Training survives a ``SIGKILL`` in the middle of writing a checkpoint: the last complete one loads, and
``--resume`` finishes the run (a corrupt image in the data is reported and skipped, not fatal)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np

from reid_ssl.checkpoint import load_checkpoint
from tests.helpers import REPO, SMOKE_CONFIG, SUBPROCESS_ENV, run_cli, write_person_image

SMOKE = str(SMOKE_CONFIG)


DIE_IN_CHECKPOINT_WRITE = textwrap.dedent("""
    import os, signal, sys, tempfile
    import reid_ssl.checkpoint as c
    real, calls = c.atomic_write_bytes, [0]
    def dying_write(path, data):  # the n-th checkpoint write is killed half-way through
        calls[0] += 1
        if calls[0] < int(sys.argv[1]):
            return real(path, data)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    c.atomic_write_bytes = dying_write
    from reid_ssl.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_faults_sigkill_during_training_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(23):
        write_person_image(data / f"{i % 6:04d}" / f"{i}.jpg", i % 6, rng)
    (data / "0003" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # 24 files: 3 batches of 8
    out = tmp_path / "run"
    argv = ["train", "-c", SMOKE, f"data.root={data}", f"train.out_dir={out}", "train.checkpoint_every_steps=2"]
    argv.append("train.checkpoint_every_epochs=1")
    # checkpoint writes: step 2, end of epoch 1 (step 3), step 4 <- killed in the middle of writing it
    killed = subprocess.run(
        [sys.executable, "-c", DIE_IN_CHECKPOINT_WRITE, "3", *argv, "-q"], cwd=REPO, env=SUBPROCESS_ENV, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL
    last_good = load_checkpoint(out / "checkpoint.pt")
    assert last_good["step"] == 3
    code, stdout, err = run_cli([*argv, "--resume", "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 6 and load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert summary["bad_images"] == 1  # the corrupt image was reported and skipped, not fatal
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [4, 5, 6]
