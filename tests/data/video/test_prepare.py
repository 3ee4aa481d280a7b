"""``prepare video`` on generated footage of known identities: purity, crossings, resume, outputs, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_ssl.config import DataConfig
from reid_ssl.data.datasets import build_source, load_split
from reid_ssl.data.video.prepare import VideoOptions, prepare_video
from reid_ssl.errors import AlreadyExistsError, DatasetLayoutError, InputError, VideoError
from tests.data.video.conftest import PEOPLE, identity_of, write_frames, write_video

OPTIONS = VideoOptions(detector="colour", min_height=20)


def tracklet_identities(out: Path) -> dict[str, list[int]]:
    """Ground-truth identity of every crop, per bag."""
    return {
        bag.name: [identity_of(cv2.imread(str(c))) for c in sorted(bag.glob("*.jpg"))]
        for bag in sorted((out / "train").iterdir())
    }


def test_tracklets_are_pure_and_cut_at_crossings(tmp_path: Path, colour_detector) -> None:
    video = write_video(tmp_path / "cam.avi")
    manifest = prepare_video([video], tmp_path / "out", options=OPTIONS)
    ids = tracklet_identities(tmp_path / "out")
    boxes = sum(len(v) for v in ids.values())
    majority = sum(max(v.count(p) for p in set(v)) for v in ids.values())
    assert majority / boxes >= 0.98  # purity
    assert sum(len(set(v)) > 1 for v in ids.values()) == 0  # no identity switch inside a tracklet
    assert {p for v in ids.values() for p in v} == set(PEOPLE)  # everyone is found
    # 1 and 2 cross half-way: their tracks are cut, so each owns (at least) two tracklets
    owners = [max(set(v), key=v.count) for v in ids.values()]
    assert owners.count(1) >= 2 and owners.count(2) >= 2
    rows = list(csv.DictReader((tmp_path / "out" / "tracks.csv").open()))
    assert len(rows) == boxes == manifest["counts"]["boxes"]
    assert set(rows[0]) >= {"input", "camera", "camid", "frame", "x", "y", "w", "h", "score", "track"}
    sheet = cv2.imread(str(tmp_path / "out" / "contact_cam.png"))
    assert sheet is not None and sheet.shape[0] >= 64 * len(ids)
    # the bags are what `reid_ssl train` reads, bag positives included
    items = build_source(DataConfig(source="video", root=str(tmp_path / "out"), positives="bag"))
    assert len(items) == boxes and len({it.bag for it in items}) == len(ids)


def test_resume_after_a_kill_redoes_at_most_one_block(tmp_path: Path, colour_detector) -> None:
    frames = write_frames(tmp_path / "frames", 90)
    clean = prepare_video([frames], tmp_path / "clean", options=OPTIONS)
    colour_detector.calls, colour_detector.fail_after = 0, 70
    with pytest.raises(KeyboardInterrupt):
        prepare_video([frames], tmp_path / "out", options=OPTIONS)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "train").exists()
    colour_detector.calls, colour_detector.fail_after = 0, None
    resumed = prepare_video([frames], tmp_path / "out", options=OPTIONS)
    assert colour_detector.calls == 90 - 50  # the first block of 50 frames was kept
    assert resumed["counts"] == clean["counts"]
    strip = lambda p: [{k: v for k, v in r.items() if k != "input"} for r in csv.DictReader(p.open())]  # noqa: E731
    assert strip(tmp_path / "out" / "tracks.csv") == strip(tmp_path / "clean" / "tracks.csv")
    colour_detector.calls = 0
    assert prepare_video([frames], tmp_path / "out", options=OPTIONS)["counts"] == clean["counts"]
    assert colour_detector.calls == 0  # finished inputs are never detected again


def test_split_writes_train_bags_and_market_layouts(tmp_path: Path, colour_detector) -> None:
    from reid_ssl.data.video.split import SplitProtocol

    opt = VideoOptions(
        detector="colour", min_height=20, split=True, protocol=SplitProtocol(min_test_len=8, queries_per_tracklet=2)
    )
    manifest = prepare_video(
        [write_video(tmp_path / "a.avi"), write_video(tmp_path / "b.avi", 60)], tmp_path / "out", ["left", "right"], opt
    )
    split = load_split("video", tmp_path / "out")
    assert manifest["split"]["test_tracklets"] >= 1 and len(split.query) >= 2 and len(split.gallery) >= 2
    assert {c for _, _, c in split.query} == {0}  # queries come from the first half of a tracklet
    bags = [p.name for p in (tmp_path / "out" / "train").iterdir()]
    assert bags and all(b.startswith(("left-", "right-")) for b in bags)
    tracks = {
        int(r["track"])
        for r in csv.DictReader((tmp_path / "out" / "tracks.csv").open())
        if r["market"].startswith("market/query")
    }
    assert not any(int(b.split("-")[1]) in tracks for b in bags)  # no test tracklet is trained on
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][1]["camera"] == "right"


def test_bad_inputs_give_clear_errors_and_publish_nothing(tmp_path: Path, colour_detector) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match=r"junk\.mp4"):
        prepare_video([tmp_path / "junk.mp4"], tmp_path / "out", options=OPTIONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="without frame images"):
        prepare_video([tmp_path / "empty"], tmp_path / "out", options=OPTIONS)
    nobody = tmp_path / "nobody"
    nobody.mkdir()
    for t in range(12):
        cv2.imwrite(str(nobody / f"{t:03d}.png"), np.full((120, 160, 3), 128, np.uint8))
    with pytest.raises(VideoError, match="no person tracklet found"):
        prepare_video([nobody], tmp_path / "out", options=OPTIONS)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_different_output_is_never_overwritten_silently(tmp_path: Path, colour_detector) -> None:
    video = write_video(tmp_path / "cam.avi", 40)
    prepare_video([video], tmp_path / "out", options=OPTIONS)
    with pytest.raises(AlreadyExistsError, match="--overwrite"):
        prepare_video([video], tmp_path / "out", options=VideoOptions(detector="colour", min_height=20, fps=5))
    again = prepare_video(
        [video], tmp_path / "out", options=VideoOptions(detector="colour", min_height=20, fps=5), overwrite=True
    )
    assert again["options"]["fps"] == 5


@pytest.mark.parametrize("source", ["video", "frames"])
def test_a_start_past_the_end_names_the_file_and_its_length(tmp_path: Path, colour_detector, source: str) -> None:
    """``--start`` beyond the footage is a clear error (file, length, fix), not "no person tracklet found"."""
    path = write_video(tmp_path / "clip.avi", 30) if source == "video" else write_frames(tmp_path / "frames", 30)
    options = dataclasses.replace(OPTIONS, start_s=60.0)
    with pytest.raises(
        InputError, match=r"--start 60 s is past its end \(30 frames, [0-9.]+ s at [0-9]+ fps\); give a start below"
    ) as err:
        prepare_video([path], tmp_path / "out", options=options)
    assert path.name in str(err.value) and not (tmp_path / "out").exists()


def _user_folder(out: Path) -> dict[Path, bytes]:
    """A folder of someone else's files whose names collide with what prepare video writes."""
    files = {
        out / "train" / "myphotos" / "holiday.jpg": b"my holiday",
        out / "market" / "query" / "notes.txt": b"my notes",
        out / "tracks.csv": b"my,tracks\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_a_folder_of_other_files_is_refused_not_emptied(tmp_path: Path, colour_detector) -> None:
    """The user test: `prepare video ... --out DIR --split` on a folder of photos deleted them; and an index."""
    video = write_video(tmp_path / "cam.avi", 40)
    files = _user_folder(tmp_path / "photos")
    with pytest.raises(AlreadyExistsError, match=r"not empty.*--overwrite"):
        prepare_video([video], tmp_path / "photos", options=dataclasses.replace(OPTIONS, split=True))
    assert {p: p.read_bytes() for p in files} == files and not (tmp_path / "photos" / ".work").exists()
    index = tmp_path / "gallery"
    index.mkdir()
    (index / "CURRENT").write_text("gen-00000001\n")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        prepare_video([video], index, options=OPTIONS)
    assert sorted(p.name for p in index.iterdir()) == ["CURRENT"]
    (tmp_path / "empty").mkdir()
    assert prepare_video([video], tmp_path / "empty", options=OPTIONS)["counts"]["tracks"] >= 1  # empty: fine
    replaced = prepare_video([video], tmp_path / "photos", options=OPTIONS, overwrite=True)  # asked for
    assert replaced["counts"]["tracks"] >= 1 and (tmp_path / "photos" / "manifest.json").is_file()


def test_its_own_unfinished_output_resumes(tmp_path: Path, colour_detector) -> None:
    """A killed run (only .work/ written) continues; the same options on a finished output reuse it."""
    video = write_video(tmp_path / "cam.avi", 40)
    first = prepare_video([video], tmp_path / "out", options=OPTIONS)
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed while publishing
    assert prepare_video([video], tmp_path / "out", options=OPTIONS)["counts"] == first["counts"]
    assert prepare_video([video], tmp_path / "out", options=OPTIONS)["counts"] == first["counts"]


def test_source_fps_is_for_frame_folders_and_never_relabels_a_videos_clock(tmp_path: Path, colour_detector) -> None:
    video = write_video(tmp_path / "cam.avi", 40)  # the file says 10 fps
    with pytest.raises(InputError, match=r"cam\.avi: --source-fps 12 is for frame folders.*reports 10 fps"):
        prepare_video([video], tmp_path / "out", options=dataclasses.replace(OPTIONS, source_fps=12.0))
    assert not (tmp_path / "out").exists()
    same = prepare_video([video], tmp_path / "out", options=dataclasses.replace(OPTIONS, source_fps=10.0))
    assert same["inputs"][0]["fps"] == 10.0  # the file's own rate, given again: accepted
    frames = write_frames(tmp_path / "frames", 20)
    folder = prepare_video([frames], tmp_path / "out2", options=dataclasses.replace(OPTIONS, source_fps=12.0))
    assert folder["inputs"][0]["fps"] == 12.0


def test_a_truncated_video_warns_with_frames_decoded_and_promised(tmp_path: Path, colour_detector, caplog) -> None:
    whole = write_video(tmp_path / "whole.avi", 90)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])  # the header still promises 90 frames
    with caplog.at_level("WARNING", logger="reid_ssl"):
        manifest = prepare_video([cut], tmp_path / "out", options=OPTIONS)
    entry = manifest["inputs"][0]
    assert entry["frames_in_header"] == 90 and 0 < entry["frames_decoded"] < 90
    assert f"cut.avi: decoding stopped after {entry['frames_decoded']} of the 90 frames" in caplog.text
    assert "frames_decoded" not in prepare_video([whole], tmp_path / "out2", options=OPTIONS)["inputs"][0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="reid_ssl"):  # again, reusing the detection pass: the same facts
        again = prepare_video([cut], tmp_path / "out", options=OPTIONS, overwrite=True)["inputs"][0]
    assert (again["frames_decoded"], again["frames_in_header"]) == (entry["frames_decoded"], 90)
    assert "cut.avi: decoding stopped after" in caplog.text


def test_eval_on_an_output_without_a_test_split_says_why(tmp_path: Path, colour_detector) -> None:
    video = write_video(tmp_path / "cam.avi", 40)
    prepare_video([video], tmp_path / "plain", options=OPTIONS)
    with pytest.raises(DatasetLayoutError, match="prepared without --split: prepare it again with --split"):
        load_split("video", tmp_path / "plain")
    short = write_video(tmp_path / "short.avi", 20)  # tracklets shorter than a test tracklet's 25 boxes
    prepare_video([short], tmp_path / "few", options=dataclasses.replace(OPTIONS, split=True))
    with pytest.raises(DatasetLayoutError, match=r"prepared with --split, but its footage gave \d+ tracklet\(s\)"):
        load_split("video", tmp_path / "few")
    with pytest.raises(DatasetLayoutError, match="build it with: reid_ssl prepare video"):
        load_split("video", tmp_path / "nothing")
