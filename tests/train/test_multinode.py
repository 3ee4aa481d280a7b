"""Two "nodes" x two processes on localhost (torchrun, static rendezvous, gloo), streaming tar shards.

Checks what a multi-node user relies on: every image is trained on exactly once per epoch across the four
ranks even though they get different numbers of batches, only rank 0 writes checkpoints and logs, the same
job size resumes, and another job size is refused with a message that says what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.checkpoint import load_checkpoint
from reid_ssl.data.image_list import scan_folder
from reid_ssl.data.shards import write_shards
from tests.helpers import SUBPROCESS_ENV, free_port, write_person_image

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
IMAGES = 72  # 18 bags x 4 -> 9 shards of 8: ranks read 24, 16, 16, 16 images (3 or 2 batches of 8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    rng = np.random.default_rng(0)
    for b in range(18):
        for n in range(4):
            write_person_image(root / "src" / f"c-{b:05d}" / f"{10 * b + n:06d}.jpg", b, rng)
    write_shards(scan_folder(root / "src"), root / "shards", samples_per_shard=8)
    return root / "shards"


def _launch(cwd: Path, shards: Path, node: int, port: int, *overrides: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "reid_ssl.cli", "train", "-c", SMOKE, "data.source=shards", f"data.root={shards}",
        "train.out_dir=run", "train.sample_log=true", "train.device=cpu", *overrides, "-q", "--json",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_nodes(tmp_path: Path, shards: Path, *overrides: str, expect: int = 0) -> str:
    """Both nodes' torchrun; returns node 0's standard output (``expect=0``) or both nodes' standard error."""
    port = free_port()
    nodes = [_launch(tmp_path / f"node{i}", shards, i, port, *overrides) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in nodes]
    if expect:
        assert all(p.returncode != 0 for p in nodes)
        return "".join(err for _, err in outs)
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs[0][0]


def _read(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)


def _samples(tmp_path: Path) -> np.ndarray:
    files = sorted(tmp_path.glob("node*/run/samples-rank*.csv"))
    files = list({f.resolve(): f for f in files}.values())  # node1/run may be node0/run
    assert sorted(f.name for f in files) == [f"samples-rank{r}.csv" for r in range(4)]
    return np.concatenate([_read(f) for f in files])


def test_two_nodes_train_every_image_once_per_epoch_and_resume(tmp_path: Path, shards: Path) -> None:
    out = _two_nodes(tmp_path, shards)
    summary = json.loads(out[out.index("{") :])
    assert summary["steps"] == 6 and summary["epochs"] == 2  # the busiest rank's 3 batches per epoch
    rows = _samples(tmp_path)
    for epoch in (0, 1):
        assert sorted(rows[rows[:, 0] == epoch, 1].tolist()) == list(range(IMAGES))
    ckpt = load_checkpoint(tmp_path / "node0" / "run" / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["world_size"] == 4
    node1 = sorted(p.name for p in (tmp_path / "node1" / "run").iterdir())
    assert node1 == ["samples-rank2.csv", "samples-rank3.csv"]  # no checkpoint, metrics or config from rank 2, 3

    refused = _two_nodes(tmp_path, shards, "train.epochs=3", expect=1)  # node 1 cannot see node 0's folder
    assert "disagree about where to start" in refused and "shared filesystem" in refused
    (tmp_path / "node1" / "run").rename(tmp_path / "node1-logs")
    (tmp_path / "node1" / "run").symlink_to(tmp_path / "node0" / "run")  # now one folder for both (shared FS)
    _two_nodes(tmp_path, shards, "train.epochs=3")  # the same job size continues: one more epoch
    rows = np.concatenate([_samples(tmp_path), *(_read(f) for f in (tmp_path / "node1-logs").iterdir())])
    assert sorted(rows[rows[:, 0] == 2, 1].tolist()) == list(range(IMAGES))
    assert load_checkpoint(tmp_path / "node0" / "run" / "checkpoint.pt")["step"] == 9

    alone = subprocess.run(
        [sys.executable, "-m", "reid_ssl.cli", "train", "-c", SMOKE, "data.source=shards", f"data.root={shards}",
         "train.out_dir=run", "train.sample_log=true", "train.device=cpu", "train.epochs=4", "-q"],
        cwd=tmp_path / "node0", env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 2
    assert "written by a job of 4 process(es); this one has 1" in alone.stderr and "model.init=" in alone.stderr
