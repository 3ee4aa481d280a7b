"""The checkpoint contract: self-describing, safe to load, atomic to write."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from reid_ssl.checkpoint import (
    BackgroundSaver,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from reid_ssl.embedder import load_embedder
from tests.helpers import write_checkpoint


def test_round_trip_with_weights_only(tmp_path):
    path = write_checkpoint(tmp_path / "c.pt", height=64, width=32)
    raw = torch.load(path, weights_only=True)  # plain types only: the safe loader accepts it
    assert raw["format"] == "reid_ssl.checkpoint" and raw["preprocess"]["height"] == 64
    ckpt = load_checkpoint(path)
    assert ckpt["backbone"]["name"] == "resnet18"
    emb = load_embedder(path)
    assert emb.preprocess == ckpt["preprocess"] and emb.feature_dim == 512
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_embedder_is_deterministic_and_normalised(tmp_path, image_folder):
    path = write_checkpoint(tmp_path / "c.pt")
    paths = sorted(image_folder.rglob("*.jpg"))[:4]
    a = load_embedder(path).embed_images(paths).features
    b = load_embedder(path).embed_images(paths).features
    assert a.shape == (4, 512) and (a == b).all()
    assert abs(float((a**2).sum(1).mean()) - 1.0) < 1e-5


def test_fingerprint_changes_with_weights_and_preprocessing(tmp_path):
    a = load_embedder(write_checkpoint(tmp_path / "a.pt", seed=0)).fingerprint
    b = load_embedder(write_checkpoint(tmp_path / "b.pt", seed=1)).fingerprint
    c = load_embedder(write_checkpoint(tmp_path / "c.pt", seed=0, height=128, width=64)).fingerprint
    assert len({a, b, c}) == 3
    assert load_embedder(tmp_path / "a.pt", flip=False).fingerprint != a


def test_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"format": "reid_ssl.checkpoint", "x": Evil()}))
    with pytest.raises(CheckpointError, match="safe loader"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_not_a_checkpoint_and_corrupt_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a reid_ssl checkpoint"):
        load_checkpoint(other)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)
    good = write_checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_tampered_weights_fail_the_hash(tmp_path):
    ckpt = load_checkpoint(write_checkpoint(tmp_path / "c.pt"))
    ckpt["backbone"]["state_dict"]["conv1.weight"].add_(1.0)
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "reid_ssl_version")}
    save_checkpoint(tmp_path / "t.pt", payload)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "t.pt")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """A process killed while writing a big checkpoint leaves the old one loadable."""
    path = write_checkpoint(tmp_path / "c.pt")
    code = f"""
import os, signal, torch
import reid_ssl.checkpoint as c
real = c.atomic_write_bytes
def slow(path, data):
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    os.write(fd, data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
c.atomic_write_bytes = slow
from tests.helpers import write_checkpoint
write_checkpoint(__import__("pathlib").Path({str(path)!r}), seed=5)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -9
    assert load_checkpoint(path)["backbone"]["name"] == "resnet18"


def test_background_saves_hold_the_weights_of_the_moment_they_were_asked(tmp_path, monkeypatch):
    """Training changes the live tensors right after ``save``: the file must hold the values at ``save`` time,
    each save waits for the one before, and a failed write is raised at the next wait, keeping the old file."""
    w = torch.zeros(1000)
    payload = {"backbone": {"state_dict": {"w": w}}, "preprocess": {}, "config": {}, "step": 1, "t": (w, 2)}
    saver = BackgroundSaver()
    saver.save(tmp_path / "c.pt", payload)
    w.add_(1.0)  # the next optimizer step, while the file is being written
    saver.wait()
    first = torch.load(tmp_path / "c.pt", weights_only=True)
    assert first["backbone"]["state_dict"]["w"].sum() == 0 and first["t"][0].sum() == 0 and first["t"][1] == 2

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    saver.save(tmp_path / "c.pt", {**payload, "step": 2})
    with pytest.raises(OSError, match="No space"):
        saver.close()
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 1
