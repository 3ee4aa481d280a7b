"""Untrusted checkpoints: no loader in reid_ssl can run code from a file, a wrong or tampered checkpoint gives a
clear error at every entry that loads one, and a full disk never costs the previous checkpoint."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch

from reid_ssl.checkpoint import CheckpointError, backbone_block, load_checkpoint, make_preprocess, save_checkpoint
from reid_ssl.embedder import load_embedder
from tests.helpers import (
    REPO,
    SMOKE_CONFIG,
    SmallDisk,
    assert_live,
    assert_one_clear_line,
    build_market_index,
    evil,
    full_disk_error,
    run_cli,
)

SMOKE = str(SMOKE_CONFIG)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return build_market_index(tmp_path_factory.mktemp("market"))


def _sources() -> list[Path]:
    return sorted([*REPO.glob("reid_ssl/**/*.py"), *REPO.glob("app/**/*.py")])


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_untrusted_every_loader_is_safe_by_construction():
    """Every torch.load has weights_only=True, every np.load allow_pickle=False; nothing else unpickles."""
    found = {"torch.load": 0, "np.load": 0}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                bad = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}
                assert not bad & {n.split(".")[0] for n in names}, f"{where}: imports an unpickler"
            if not isinstance(node, ast.Call):
                continue
            name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                found[name] += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if name in ("np.load", "numpy.load"):
                found["np.load"] += 1
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load"), where
            assert name not in ("eval", "exec"), where
            if "shell" in kw:
                assert isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False, where
    assert found["torch.load"] >= 1 and found["np.load"] >= 4, found  # the scan does see the (one) loaders


CHECKPOINT_ENTRIES = [
    "checkpoint-pickle",
    "checkpoint-torch-zip",
    "cli-eval-checkpoint",
    "cli-index-build-checkpoint",
    "cli-app-checkpoint",
    "cli-train-resume",
    "cli-train-init",
]


@pytest.mark.parametrize("where", CHECKPOINT_ENTRIES)
def test_untrusted_pickle_that_would_create_a_file_is_refused(tmp_path, market, where):
    """(The same for index files: tests/index/test_safety.py; for eval's feature cache: tests/eval/test_safety.py.)"""
    kind = "torch" if where == "checkpoint-torch-zip" else "pickle"
    assert_live(kind, tmp_path)
    marker = tmp_path / "created-by-the-pickle"
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(evil(kind, marker))
    images = market.tree / "bounding_box_train"
    if where.startswith("checkpoint"):
        with pytest.raises(CheckpointError, match="safe loader refused"):
            load_embedder(ckpt)
    else:
        argv = {
            "cli-eval-checkpoint": ["eval", "--checkpoint", str(ckpt), "--dataset", "market-layout"],
            "cli-index-build-checkpoint": ["index", "build", "--checkpoint", str(ckpt), "--images", str(images)],
            "cli-app-checkpoint": ["app", "--index", str(market.index), "--checkpoint", str(ckpt)],
            "cli-train-resume": ["train", "-c", SMOKE, f"data.root={images}", "--resume", str(ckpt)],
            "cli-train-init": ["train", "-c", SMOKE, f"data.root={images}", f"model.init={ckpt}"],
        }[where]
        if where == "cli-eval-checkpoint":
            argv += ["--root", str(market.tree)]
        if where == "cli-index-build-checkpoint":
            argv += ["--out", str(tmp_path / "out")]
        if where.startswith("cli-train"):
            argv += [f"train.out_dir={tmp_path / 'run'}", "--json"]
        code, _, err = run_cli(argv)
        assert_one_clear_line(code, err, str(ckpt))
        assert "weights_only=False" not in err  # never the advice to load it unsafely
    assert not marker.exists()


def test_untrusted_wrong_format_or_mismatched_hash_gives_a_clear_error(tmp_path, market):
    """(Indexes: tests/index/test_safety.py.)"""
    good = load_checkpoint(market.checkpoint)
    payload = {k: v for k, v in good.items() if k not in ("format", "format_version", "reid_ssl_version")}
    cases = {}
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    cases["other.pt"] = "not a reid_ssl checkpoint"
    (tmp_path / "text.pt").write_text("hello")
    cases["text.pt"] = "not a loadable reid_ssl checkpoint"
    full = {"format": "reid_ssl.checkpoint", "format_version": 99, **payload}
    buf = io.BytesIO()
    torch.save(full, buf)
    (tmp_path / "newer.pt").write_bytes(buf.getvalue())
    cases["newer.pt"] = "newer than this"
    tampered = {**payload, "backbone": {**payload["backbone"], "state_dict": dict(payload["backbone"]["state_dict"])}}
    tampered["backbone"]["state_dict"]["conv1.weight"] = tampered["backbone"]["state_dict"]["conv1.weight"] + 1
    save_checkpoint(tmp_path / "tampered.pt", tampered)
    cases["tampered.pt"] = "do not match their recorded sha256"
    save_checkpoint(tmp_path / "huge.pt", {**payload, "preprocess": make_preprocess(1_000_000, 64)})
    cases["huge.pt"] = "preprocess height=1000000"
    data = market.checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "not a loadable reid_ssl checkpoint"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    code, _, err = run_cli(["index", "search", "--index", str(market.index), "--query", str(market.queries()[0])])
    assert code == 0, err  # the control: the right checkpoint answers
    for name, message in cases.items():
        code, _, err = run_cli(
            ["eval", "--checkpoint", str(tmp_path / name), "--dataset", "market-layout", "--root", str(market.tree)]
        )
        assert_one_clear_line(code, err, message)


def test_faults_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    with SmallDisk(tmp_path / "disk") as small_disk:
        path = small_disk.folder / "run" / "checkpoint.pt"
        old = {"backbone": backbone_block("resnet18", 4, {"w": torch.zeros(4)}), "preprocess": make_preprocess(8, 4)}
        save_checkpoint(path, {**old, "config": {}, "step": 1})
        new = {
            "backbone": backbone_block("resnet18", 4, {"w": torch.ones(1 << 20)}),
            "preprocess": make_preprocess(8, 4),
        }
        with small_disk.full(), pytest.raises(OSError) as e:
            save_checkpoint(path, {**new, "config": {}, "step": 2})
        full_disk_error(e, f"could not write {path}")
        assert load_checkpoint(path)["step"] == 1
        assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
