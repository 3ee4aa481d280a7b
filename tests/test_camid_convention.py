"""One camera-id convention everywhere: a Market file name's ``c1`` is camid 0 in evaluation lists, torchreid's
own parser, the index sidecar, ``index search --exclude-camid``, and the app's captions and camera filter."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reid_ssl.app.service import caption, query_camid
from reid_ssl.data.datasets import load_split
from reid_ssl.data.market import parse_market_name
from reid_ssl.data.torchreid_bridge import import_torchreid
from reid_ssl.index import GalleryIndex
from tests.helpers import build_market_index, run_cli


def _camid_in_name(path: str) -> int:
    return int(re.search(r"_c(\d+)s", Path(path).name).group(1)) - 1


def test_c1_is_camid_0_in_eval_torchreid_index_cli_and_app(tmp_path: Path) -> None:
    m = build_market_index(tmp_path)
    name = "0011_c1s1_000000_00.jpg"
    assert parse_market_name(name).camid == 0

    split = load_split("market-layout", m.tree)  # evaluation lists
    assert all(camid == _camid_in_name(p) for p, _, camid in split.query + split.gallery)
    assert {c for _, _, c in split.gallery} == {0, 1, 2}

    torchreid = import_torchreid()  # torchreid's own Market parser agrees
    parsed = torchreid.data.datasets.image.market1501.Market1501.process_dir(None, str(m.tree / "query"), relabel=False)
    assert sorted((Path(p).name, c) for p, _, c in parsed) == sorted((Path(p).name, c) for p, _, c in split.query)

    idx = GalleryIndex.load(m.index)  # the index sidecar
    items = idx.items(idx.ids)
    assert all(item["camid"] == _camid_in_name(item["path"]) for item in items.values())

    query = str(m.tree / "query" / name)
    code, out, err = run_cli(["index", "search", "--index", str(m.index), "--query", query, "-k", "50",
                              "--exclude-camid", "0", "--json"])  # fmt: skip
    assert code == 0, err
    hits = json.loads(out)["queries"][0]["results"]
    assert hits and all(h["camid"] != 0 and "_c1s" not in h["path"] for h in hits)

    assert query_camid("auto", name) == 0  # the app: the query's camera read from its name
    hit = idx.search_embedded(m.embedder, [query], k=1)[0][0]
    assert f"camid {_camid_in_name(hit.path)}" in caption(hit)
