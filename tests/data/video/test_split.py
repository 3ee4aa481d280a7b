"""Tracklets -> train bags, test and validation retrieval splits of pseudo-identities."""

from __future__ import annotations

from reid_ssl.data.market import market_name, parse_market_name
from reid_ssl.data.video.split import SplitProtocol, split_counts, split_tracklets
from reid_ssl.data.video.track import TrackBox


def _tracks(lengths: dict[int, int], start: int = 0) -> list[TrackBox]:
    return [TrackBox(start + t, k, 4 * k, 10, 12, 24) for k, n in lengths.items() for t in range(n)]


def test_split_tracklets_protocol() -> None:
    lengths = {1: 30, 2: 25, 3: 4, 4: 21, 5: 40, 6: 20, 7: 8, 8: 19, 9: 22}
    items = split_tracklets(
        _tracks(lengths),
        SplitProtocol(min_test_len=20, test_every=3, test_offset=1, queries_per_tracklet=2, val_every=0),
    )
    # tracklets with >= 20 boxes, by id: 1 2 4 5 6 9 -> every 3rd from the 2nd: 2 and 6
    test = {i.box.track for i in items if i.subset != "train"}
    train = {i.box.track for i in items if i.subset == "train"}
    assert test == {2, 6}
    assert train == {1, 4, 5, 7, 8, 9}  # 3 is shorter than min_train_len
    for k in test:
        mine = [i for i in items if i.box.track == k]
        queries = [i for i in mine if i.subset == "query"]
        assert len(queries) == 2 and all(q.camid == 0 for q in queries)
        assert sum(i.camid == 0 for i in mine) == (lengths[k] + 1) // 2
        cam1_frames = [i.box.frame for i in mine if i.camid == 0]
        cam2_frames = [i.box.frame for i in mine if i.camid == 1]
        assert max(cam1_frames) < min(cam2_frames)
    # queries are spread over the camera-1 half: 25 boxes -> 13 in c1 -> positions 3 and 9
    assert sorted(i.box.frame for i in items if i.box.track == 2 and i.subset == "query") == [3, 9]
    # the default takes 8 queries per test tracklet, all from its camera-1 half
    default = split_tracklets(_tracks(lengths), SplitProtocol(min_test_len=20, test_every=3, test_offset=1))
    queries = [i for i in default if i.box.track == 2 and i.subset == "query"]
    assert len(queries) == 8 and all(q.camid == 0 for q in queries)


def test_validation_tracklets_come_from_the_long_ones_left_after_test() -> None:
    lengths = {1: 30, 2: 25, 3: 4, 4: 21, 5: 40, 6: 20, 7: 8, 8: 19, 9: 22}
    items = split_tracklets(_tracks(lengths), SplitProtocol(min_test_len=20, test_every=3, test_offset=1))
    # long: 1 2 4 5 6 9; test: 2 6; the rest 1 4 5 9, every 2nd from the first: 1 and 5
    assert {i.box.track for i in items if i.subset.startswith("val_")} == {1, 5}
    assert {i.box.track for i in items if i.subset == "train"} == {4, 7, 8, 9}
    counts = split_counts(items)
    assert (counts["train_tracklets"], counts["test_tracklets"], counts["val_tracklets"]) == (4, 2, 2)
    assert items[0].market_path.startswith("market_val/query/") or "market" in items[0].market_path


def test_market_name_is_parsed_back() -> None:
    name = market_name(7, 1, 123)  # camid 1 = file name camera c2
    assert name == "0007_c2s1_000123_00.jpg"
    m = parse_market_name(name)
    assert m is not None and (m.pid, m.camid, m.frame) == (7, 1, 123)
