"""The training loop end to end on generated images: CLI, checkpoints, kill + resume, DDP, paper configs."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.checkpoint import load_checkpoint
from reid_ssl.cli.main import main
from reid_ssl.embedder import load_embedder
from tests.helpers import write_person_image

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_images(tmp_path_factory) -> Path:
    """8 'tracklets' x 6 images: 48 images, 6 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp("smoke") / "images"
    rng = np.random.default_rng(0)
    for pid in range(8):
        for n in range(6):
            write_person_image(root / f"{pid:04d}" / f"{n}.jpg", pid, rng)
    return root


def cli_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_smoke_train_writes_a_usable_checkpoint(tmp_path, smoke_images, capsys):
    out = tmp_path / "run"
    summary = cli_json(capsys, ["train", "-c", SMOKE, f"data.root={smoke_images}", f"train.out_dir={out}", "--json"])
    assert summary["steps"] == 12 and summary["epochs"] == 2 and math.isfinite(summary["loss"])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 12 and ckpt["config"]["data"]["root"] == str(smoke_images)
    assert ckpt["preprocess"] == {
        "height": 32,
        "width": 16,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["ema_momentum"] == pytest.approx(0.99) and records[-1]["ema_momentum"] > 0.999
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 and -1 <= r["pos_cos"] <= 1 for r in records)
    assert (out / "loss_curve.png").stat().st_size > 1000
    with (out / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == list(range(1, 13))
    assert [float(r["loss"]) for r in table] == pytest.approx([r["loss"] for r in records])
    emb = load_embedder(out / "checkpoint.pt")
    assert emb.embed_images(sorted(smoke_images.rglob("*.jpg"))[:3]).features.shape == (3, 512)


@pytest.mark.parametrize("loss", ["byol", "simclr", "median_triplet"])
def test_baselines_train_in_the_same_loop(tmp_path, smoke_images, capsys, loss):
    extra = ["model.target=shared", "model.predictor=false"] if loss == "simclr" else []
    summary = cli_json(
        capsys,
        [
            "train",
            "-c",
            SMOKE,
            f"data.root={smoke_images}",
            f"train.out_dir={tmp_path}",
            f"loss.name={loss}",
            "train.max_steps=3",
            "--json",
            *extra,
        ],
    )
    assert summary["steps"] == 3 and math.isfinite(summary["loss"])


def test_bag_positives_and_lars_and_accumulation(tmp_path, smoke_images, capsys):
    summary = cli_json(
        capsys,
        [
            "train",
            "-c",
            SMOKE,
            f"data.root={smoke_images}",
            f"train.out_dir={tmp_path}",
            "data.positives=bag",
            "optim.name=lars",
            "optim.lr=0.3",
            "train.accumulate=2",
            "model.multires=false",
            "--json",
        ],
    )
    assert summary["steps"] == 6  # 6 micro-batches per epoch / 2 per step x 2 epochs


def test_corrupt_images_are_skipped_and_counted_or_fatal(tmp_path, smoke_images, capsys):
    data = tmp_path / "data"
    for p in smoke_images.rglob("*.jpg"):
        (data / p.parent.name).mkdir(parents=True, exist_ok=True)
        (data / p.parent.name / p.name).write_bytes(p.read_bytes())
    for k in range(3):
        (data / "0000" / f"bad{k}.jpg").write_bytes(b"garbage")
    argv = ["train", "-c", SMOKE, f"data.root={data}", f"train.out_dir={tmp_path / 'o'}", "--json"]
    summary = cli_json(capsys, argv)
    assert summary["bad_images"] == 3
    assert main([*argv, "data.bad_images=fail", "--overwrite"]) == 2  # bad input, not a failed run
    err = capsys.readouterr().err
    assert "unreadable training image" in err and "bad" in err and "data.bad_images=skip" in err


def test_clear_errors_for_bad_config_and_missing_data(tmp_path, capsys):
    assert main(["train", "-c", SMOKE, "optim.learnig_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learnig_rate'" in err and "lr" in err and "Traceback" not in err
    out = f"train.out_dir={tmp_path / 'run'}"
    assert main(["train", "-c", SMOKE, f"data.root={tmp_path / 'nowhere'}", out]) == 2
    assert "expected an image folder" in capsys.readouterr().err
    assert main(["train", "data.source=pets09", f"data.root={tmp_path}", out]) == 2
    assert "reid_ssl prepare pets09" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a run that cannot start leaves no output folder behind
    assert main(["train", "-c", str(tmp_path / "missing.yaml")]) == 2


def test_print_config(capsys):
    assert main(["train", "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out


def _train_cmd(out: Path, images: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reid_ssl.cli",
        "train",
        "-c",
        SMOKE,
        f"data.root={images}",
        f"train.out_dir={out}",
        "train.epochs=4",
        "train.checkpoint_every_steps=2",
        "-q",
        *extra,
    ]


def test_sigkill_then_resume_finishes_the_same_schedule(tmp_path, smoke_images):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(out, smoke_images),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 2 <= killed_at < 24

    done = subprocess.run(
        _train_cmd(out, smoke_images, "--resume", "--json"), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed_at_step"] == killed_at
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert summary["steps"] == ckpt["step"] == 24 and ckpt["epoch"] == 4 and math.isfinite(summary["loss"])
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps[-1] == 24 and set(range(killed_at + 1, 25)) <= set(steps)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path, smoke_images, capsys, monkeypatch, workers):
    """Interrupting in the middle of an epoch, right after a checkpoint, and resuming gives the same weights as
    one uninterrupted run, with loader workers too; with workers the result does not depend on their number."""
    import torch

    from reid_ssl.checkpoint import BackgroundSaver

    common = [
        "-c",
        SMOKE,
        f"data.root={smoke_images}",
        "train.checkpoint_every_steps=3",
        "--json",
        "model.multires=false",
        f"data.num_workers={workers}",
    ]
    cli_json(capsys, ["train", *common, f"train.out_dir={tmp_path / 'a'}"])

    real_save = BackgroundSaver.save

    def save_then_stop(self, path, payload):
        real_save(self, path, payload)
        if payload["step"] == 9:  # interrupted while this checkpoint is still being written in the background:
            raise KeyboardInterrupt  # the loop waits for it before leaving

    monkeypatch.setattr(BackgroundSaver, "save", save_then_stop)
    assert main(["train", *common, f"train.out_dir={tmp_path / 'b'}"]) == 130
    monkeypatch.setattr(BackgroundSaver, "save", real_save)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 9
    cli_json(capsys, ["train", *common, f"train.out_dir={tmp_path / 'b'}", "--resume"])
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["backbone"]["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["backbone"]["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    if workers:  # one worker takes every sample that two shared: the same views, the same weights
        one = [*common[:-1], "data.num_workers=1"]
        cli_json(capsys, ["train", *one, f"train.out_dir={tmp_path / 'c'}"])
        c = load_checkpoint(tmp_path / "c" / "checkpoint.pt")["backbone"]["state_dict"]
        assert all(torch.allclose(a[k].float(), c[k].float(), atol=1e-5) for k in a)


@pytest.mark.parametrize("gather", ["false", "true"])
def test_ddp_two_processes_gloo(tmp_path, smoke_images, gather):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + (gather == "true")),
        "-m",
        "reid_ssl.cli",
        "train",
        "-c",
        SMOKE,
        f"data.root={smoke_images}",
        f"train.out_dir={tmp_path}",
        f"loss.gather_negatives={gather}",
        "-q",
        "--json",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["steps"] == 6  # 48 images / (8 per rank x 2 ranks) = 3 steps per epoch
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


@pytest.mark.slow
def test_paper_configs_start_on_cpu(tmp_path, smoke_images, capsys):
    """One LARS step of the ResNet-50 paper configs at 224 px (batch shrunk to fit a CPU test)."""
    small = [
        "data.source=folder",
        f"data.root={smoke_images}",
        "train.batch_size=11",
        "train.amp=none",
        "train.max_steps=1",
        "train.accumulate=2",
        "data.num_workers=0",
        "train.device=cpu",
        "--json",
        "-q",
    ]
    imagenet = tmp_path / "imagenet"
    s = cli_json(
        capsys, ["train", "-c", str(REPO / "configs/imagenet_r50_paper.yaml"), *small, f"train.out_dir={imagenet}"]
    )
    assert s["steps"] == 1 and math.isfinite(s["loss"])
    s = cli_json(
        capsys,
        [
            "train",
            "-c",
            str(REPO / "configs/sysu30k_r50_paper.yaml"),
            *small,
            f"train.out_dir={tmp_path / 'sysu'}",
            f"model.init={imagenet / 'checkpoint.pt'}",
        ],
    )
    assert s["steps"] == 1
    a = load_checkpoint(imagenet / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "sysu" / "checkpoint.pt")
    assert b["config"]["model"]["init"].endswith("checkpoint.pt") and b["preprocess"]["height"] == 256
    assert a["backbone"]["name"] == b["backbone"]["name"] == "resnet50"


def test_accumulation_larger_than_an_epoch_is_a_clear_error(tmp_path, smoke_images):
    """48 images at batch 11 give 4 micro-batches: accumulating 8 could never take a step (it used to hang)."""
    argv = ["train", "-c", SMOKE, f"data.root={smoke_images}", "train.batch_size=11", "train.accumulate=8"]
    assert main([*argv, f"train.out_dir={tmp_path}"]) == 2


def test_k_rule_cli(capsys):
    result = cli_json(capsys, ["k-rule", "--negatives", "195", "--classes", "1000", "--json"])
    probs = [round(r["p_true_negative"], 3) for r in result["table"]]
    assert probs[:3] == [0.823, 0.983, 0.999] and result["smallest_k"] == 3
    assert main(["k-rule", "--negatives", "195", "--classes", "1000"]) == 0
    assert "0.823" in capsys.readouterr().out
    assert main(["k-rule", "--negatives", "0", "--classes", "10"]) == 2
