"""``reid_ssl prepare video`` from the command line: outputs, JSON, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from reid_ssl.cli import main
from tests.data.video.conftest import colour_detector, write_video  # noqa: F401  (the fixture)


def test_prepare_video_cli(tmp_path: Path, capsys, colour_detector) -> None:  # noqa: F811
    video = write_video(tmp_path / "hall.avi", 50)
    argv = [
        "prepare",
        "video",
        str(video),
        "--out",
        str(tmp_path / "out"),
        "--detector",
        "colour",
        "--min-height",
        "20",
    ]
    assert main([*argv, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["inputs"][0]["camera"] == "hall" and manifest["counts"]["tracks"] >= 4
    assert main(argv) == 0  # again: the finished input is reused, the table is printed
    out = capsys.readouterr().out
    assert "tracklet bags ready" in out and "data.source=video" in out
    assert main([*argv, "--fps", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare", "video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o2")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert main(["prepare", "video", str(video), "--out", str(tmp_path / "o3"), "--detector", "fasterrcnn"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["prepare", "video", str(video), "--out", str(tmp_path / "o4"), "--camera", "a", "b"]) == 2
    assert "--camera was given 2 times for 1 inputs" in capsys.readouterr().err


def test_prepare_video_warns_about_splits_too_small_to_score(tmp_path: Path, capsys, colour_detector) -> None:  # noqa: F811
    """A few people in a short clip give test/validation splits of one or two pseudo-identities."""
    video = write_video(tmp_path / "hall.avi", 50)
    argv = ["prepare", "video", str(video), "--out", str(tmp_path / "o"), "--detector", "colour"]
    assert main([*argv, "--min-height", "20", "--split", "--json"]) == 0
    captured = capsys.readouterr()
    split = json.loads(captured.out)["split"]
    assert min(split["test_tracklets"], split["val_tracklets"]) < 5  # the generated clip has a handful of people
    assert "WARNING" in captured.err and "say little" in captured.err


def test_prepare_video_says_when_a_split_is_empty(tmp_path: Path, capsys, colour_detector) -> None:  # noqa: F811
    """Tracklets too short for a test split: the warning says the split is empty and eval has nothing to query."""
    video = write_video(tmp_path / "hall.avi", 20)
    argv = ["prepare", "video", str(video), "--out", str(tmp_path / "o"), "--detector", "colour"]
    assert main([*argv, "--min-height", "20", "--split", "--json"]) == 0
    err = capsys.readouterr().err
    assert "test_tracklets 0" in err and "the test and val splits are empty" in err and "nothing to query" in err
    assert "say little" not in err and "every ranking scores 100%" not in err


def test_prepare_video_refuses_a_source_fps_that_contradicts_the_file(tmp_path: Path, capsys) -> None:
    video = write_video(tmp_path / "hall.avi", 10)
    argv = ["prepare", "video", str(video), "--out", str(tmp_path / "o"), "--source-fps", "12", "--end", "1"]
    assert main(argv) == 2
    assert "--source-fps 12 is for frame folders" in capsys.readouterr().err and not (tmp_path / "o").exists()
