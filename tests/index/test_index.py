"""GalleryIndex: FAISS search against brute force, stable ids, atomic saves, locks, resumable and sharded builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from tests.helpers import free_port, write_checkpoint, write_market_tree, write_person_image

from reid_ssl import cli
from reid_ssl.index import gallery as index_mod
from reid_ssl.embedder import load_embedder
from reid_ssl.index.gallery import INDEX_TYPES, BuildOptions, EmbedderMismatchError, GalleryIndex, GalleryItem, IndexFormatError, IndexLockedError, StaleIndexError, WriterLock, build_index, calibrate_threshold, current_generation, describe_calibration, gallery_source, index_spec, open_set_scores, parse_market_name

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def info(dim: int, fingerprint: str = "f" * 64) -> dict:
    return {
        "fingerprint": fingerprint,
        "preprocess": {"height": 8, "width": 4},
        "feature_dim": dim,
        "flip": True,
        "checkpoint": None,
    }


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, dim: int, per_cluster: int = 50, noise: float = 0.5, seed: int = 0):
    """A re-ID-like gallery: unit vectors around n/per_cluster identity centres (cosine ~0.8 within one).

    Queries: 100 further crops of gallery identities, then 100 crops of identities absent from the gallery
    (their top 10 are near-ties, which is what makes approximate search miss).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per_cluster + 100, dim)).astype(np.float32)
    labels = rng.integers(0, n // per_cluster, n)
    x = unit(centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32))
    q_labels = np.concatenate([rng.integers(0, n // per_cluster, 100), n // per_cluster + np.arange(100)])
    q = unit(centres[q_labels] + noise * rng.standard_normal((200, dim)).astype(np.float32))
    return x, q, labels


def items(n: int, start: int = 0, cams: int = 2) -> list[GalleryItem]:
    return [GalleryItem(path=f"/g/{i}.jpg", pid=i // 4, camid=i % cams + 1, frame=i) for i in range(start, start + n)]


def ids_of(hits) -> list[list[int]]:
    return [[h.id for h in row] for row in hits]


# ---------------------------------------------------------------------------------------------------------
# Metadata parsing and sources
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", {"pid": 2, "camid": 1, "frame": 451, "tracklet": None}),
        ("-1_c3s2_012345_00.jpg", {"pid": -1, "camid": 3, "frame": 12345, "tracklet": None}),
        ("0017_c2_000100.png", {"pid": 17, "camid": 2, "frame": 100, "tracklet": None}),
        ("holiday.jpg", None),
        ("0002_x1s1_000451_03.jpg", None),
    ],
)
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected


def test_parse_market_name_tracklets():
    assert parse_market_name("0042_c2s1_000007_00.jpg", pid_is_tracklet=True)["tracklet"] == 42


def test_gallery_source_market_layout(market_tree):
    src = gallery_source(market_tree)
    assert len(src.items) == 36 and len(src.queries) == 5
    assert all("bounding_box_test" in it.path for it in src.items)
    assert {it.camid for it in src.items} == {1, 2, 3}


def test_gallery_source_pets09_by_name(tmp_path, market_tree):
    (tmp_path / "data" / "pets09").mkdir(parents=True)
    market_tree.rename(tmp_path / "data" / "pets09" / "market")
    src = gallery_source("pets09", tmp_path / "data")
    assert src.pid_is_tracklet and all(it.tracklet == it.pid for it in src.items if it.pid >= 0)
    with pytest.raises(FileNotFoundError, match="prepare pets09"):
        gallery_source("pets09", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data sets"):
        gallery_source("pets10", tmp_path / "data")


def test_gallery_source_skips_symlinks_leaving_the_folder(tmp_path, image_folder):
    secret = write_person_image(tmp_path / "outside" / "secret.jpg", 1, np.random.default_rng(0))
    (image_folder / "link.jpg").symlink_to(secret)
    src = gallery_source(image_folder)
    assert len(src.items) == 30
    assert [p for p, _ in src.skipped] == [str(image_folder / "link.jpg")]


# ---------------------------------------------------------------------------------------------------------
# Index types against brute force
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INDEX_TYPES))
def test_every_index_type_builds_from_its_factory_string(name):
    spec = index_spec(name, 50_000, 64)
    index = faiss.index_factory(64, "IDMap2," + spec.factory, faiss.METRIC_INNER_PRODUCT)
    assert index.d == 64 and spec.type == name


def test_unknown_index_type_lists_choices():
    with pytest.raises(KeyError, match="ivf-flat"):
        index_spec("lsh", 10, 8)


def test_flat_top_k_equals_brute_force_with_gaps_in_ids():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((1500, 32)))
    idx = GalleryIndex.create(info(32), "flat")
    idx.add(x, items(1500))
    idx.remove(np.arange(0, 1500, 7))  # ids with gaps: results must be ids, not row numbers
    q = unit(rng.standard_normal((50, 32)))
    hits = idx.search(q, 10)
    keep = np.setdiff1d(np.arange(1500), np.arange(0, 1500, 7))
    sim = q @ x[keep].T
    expected = keep[np.argsort(-sim, axis=1, kind="stable")[:, :10]]
    assert ids_of(hits) == expected.tolist()
    np.testing.assert_allclose([[h.score for h in r] for r in hits], -np.sort(-sim, axis=1)[:, :10], atol=1e-5)
    assert hits[0][0].path == f"/g/{hits[0][0].id}.jpg"


@pytest.mark.parametrize(
    ("name", "n", "min_recall"), [("ivf-flat", 20_000, 0.95), ("hnsw", 20_000, 0.95), ("ivf-pq", 3_000, 0.90)]
)
def test_approximate_index_recall_on_clustered_data(name, n, min_recall):
    x, q, _ = clustered(n, 64)
    idx = GalleryIndex.create(info(64), name)
    idx.add(x, items(n))
    spec = idx.spec
    if spec.nprobe:  # the approximation is real: a small share of the lists is visited
        nlist = faiss.extract_index_ivf(idx._index).nlist
        assert spec.nprobe <= nlist // 2
    _, exact = idx.search_exact(q, 10)

    def recall(**kw) -> float:
        got = ids_of(idx.search(q, 10, **kw))
        return float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)]))

    assert recall() >= min_recall, f"{name} ({spec.factory}) recall@10 {recall():.3f}"
    if spec.nprobe:  # and this set can tell: visiting a single list misses many neighbours
        assert recall(nprobe=1) < 0.9


def test_auto_type_grows_from_flat_to_ivf(monkeypatch):
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 2000)
    x, _, _ = clustered(5000, 32)
    idx = GalleryIndex.create(info(32))
    idx.add(x[:1500], items(1500))
    assert idx.spec.type == "flat"
    idx.add(x[1500:], items(3500, start=1500))
    assert idx.spec.type == "ivf-flat" and idx.ntotal == 5000
    assert [r[0].id for r in idx.search(x[[10, 4000]], 1)] == [10, 4000]


def test_a_trained_type_on_a_tiny_gallery_stays_exact_until_it_can_train():
    x, _, _ = clustered(3000, 32)
    idx = GalleryIndex.create(info(32), "ivf-flat")
    idx.add(x[:20], items(20))
    assert idx.spec.type == "flat" and idx.search(x[3], 1)[0][0].id == 3
    idx.add(x[20:], items(2980, start=20))
    assert idx.spec.type == "ivf-flat" and idx.ntotal == 3000


def test_exclude_camera_and_ids():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((400, 16)))
    idx = GalleryIndex.create(info(16), "flat")
    idx.add(x, items(400, cams=3))
    q = x[:5]
    hits = idx.search(q, 10, exclude_camid=1, exclude_ids=[1, 2])
    cams = np.array([it.camid for it in items(400, cams=3)])
    allowed = np.flatnonzero((cams != 1) & ~np.isin(np.arange(400), [1, 2]))
    expected = allowed[np.argsort(-(q @ x[allowed].T), axis=1, kind="stable")[:, :10]]
    assert ids_of(hits) == expected.tolist()
    assert all(h.camid != 1 for row in hits for h in row)


def test_empty_index_searches_to_nothing_and_k_is_validated():
    idx = GalleryIndex.create(info(8))
    assert idx.search(np.ones(8), 5) == [[]]
    idx.add(unit(np.eye(8)[:3]), items(3))
    assert len(idx.search(np.ones(8), 5)[0]) == 3  # k larger than the gallery
    with pytest.raises(ValueError, match="k must be"):
        idx.search(np.ones(8), 0)
    with pytest.raises(ValueError, match="shape"):
        idx.search(np.ones(9), 1)


# ---------------------------------------------------------------------------------------------------------
# Ids, persistence, formats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_ids_stable_across_add_remove_save_load(tmp_path, name):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((30, 16)))
    idx = GalleryIndex.create(info(16), name)
    assert idx.add(x[:20], items(20)).tolist() == list(range(20))
    assert idx.remove([3, 4, 5, 99]) == 3
    assert idx.add(x[20:], items(10, start=20)).tolist() == list(range(20, 30))  # never reuses 3..5
    idx.save(tmp_path / "idx")
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.ids.tolist() == [i for i in range(30) if i not in (3, 4, 5)]
    for i in (0, 19, 20, 29):
        assert back.search(x[i], 1)[0][0].id == i
        assert back.items([i])[i]["path"] == f"/g/{i}.jpg"
    assert back.manifest["next_id"] == 30 and back.add(x[:1], items(1)).tolist() == [30]


def test_save_load_round_trip(tmp_path):
    x, q, _ = clustered(3000, 32)
    idx = GalleryIndex.create(info(32), "ivf-flat")
    idx.add(x, items(3000))
    idx.set_calibration({"threshold": 0.5, "source": "test"})
    before = idx.search(q, 10)
    idx.save(tmp_path / "idx")
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.search(q, 10) == before  # same ids, scores and metadata
    np.testing.assert_array_equal(back.vectors, idx.vectors)
    assert back.threshold == 0.5 and back.spec == idx.spec and back.fingerprint == idx.fingerprint
    assert current_generation(tmp_path / "idx") == 1
    back.remove([0])
    back.save()
    assert current_generation(tmp_path / "idx") == 2 and GalleryIndex.load(tmp_path / "idx").ntotal == 2999
    assert sorted(p.name for p in (tmp_path / "idx").glob("gen-*")) == ["gen-00000001", "gen-00000002"]


def test_load_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GalleryIndex.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no reid_ssl index"):
        GalleryIndex.load(tmp_path / "empty")
    idx = GalleryIndex.create(info(8))
    idx.add(unit(np.eye(8)), items(8))
    idx.save(tmp_path / "idx")
    gen = tmp_path / "idx" / "gen-00000001"
    manifest = json.loads((gen / "manifest.json").read_text())
    (gen / "manifest.json").write_text(json.dumps({**manifest, "format": "something.else"}))
    with pytest.raises(IndexFormatError, match="not a reid_ssl index"):
        GalleryIndex.load(tmp_path / "idx")
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with open(gen / "index.faiss", "r+b") as f:
        f.truncate(100)
    with pytest.raises(IndexFormatError, match="damaged"):
        GalleryIndex.load(tmp_path / "idx")


def test_pickled_vectors_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    idx = GalleryIndex.create(info(8))
    idx.add(unit(np.eye(8)), items(8))
    idx.save(tmp_path / "idx")
    gen = tmp_path / "idx" / "gen-00000001"
    evil = np.empty((8, 8), dtype=object)
    evil[0, 0] = Evil()
    np.save(gen / "vectors.npy", evil, allow_pickle=True)
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["files"]["vectors.npy"] = (gen / "vectors.npy").stat().st_size
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="cannot read"):
        GalleryIndex.load(tmp_path / "idx")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Faults: failed and killed saves, concurrent writers and readers
# ---------------------------------------------------------------------------------------------------------


def test_failed_save_keeps_previous_index(tmp_path, monkeypatch):
    idx = GalleryIndex.create(info(8))
    idx.add(unit(np.eye(8)), items(8))
    idx.save(tmp_path / "idx")
    idx.add(unit(np.ones((1, 8))), items(1, start=8))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_mod, "_save_npy", disk_full)
    with pytest.raises(OSError, match="No space left"):
        idx.save()
    monkeypatch.undo()
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.ntotal == 8 and current_generation(tmp_path / "idx") == 1
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp")] == []
    idx.save()  # the same object can still save once the disk is back
    assert GalleryIndex.load(tmp_path / "idx").ntotal == 9


SAVE_LOOP = textwrap.dedent("""
    import sys, numpy as np
    from reid_ssl.index import GalleryIndex, GalleryItem
    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    while True:
        with GalleryIndex.open_for_update(folder) as idx:
            x = rng.standard_normal((2000, 64)).astype(np.float32)
            idx.add(x, [GalleryItem(path=f"/p/{i}.jpg") for i in range(2000)])
        print(GalleryIndex.load(folder).ntotal, flush=True)
""")


def test_sigkill_at_random_points_of_saves_keeps_a_loadable_index(tmp_path):
    """SIGKILL a process that saves in a loop, at random moments: every time, the index loads, whole."""
    folder = tmp_path / "idx"
    idx = GalleryIndex.create(info(64), "flat")
    idx.add(unit(np.random.default_rng(0).standard_normal((2000, 64))), items(2000))
    idx.save(folder)
    rng = np.random.default_rng(4)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline()  # at least one save done: kill during a later one
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        back = GalleryIndex.load(folder)
        assert back.ntotal % 2000 == 0 and back.ntotal == back._index.ntotal == len(back.items(back.ids))
        assert back.ids.tolist() == list(range(back.ntotal))
    with GalleryIndex.open_for_update(folder) as again:  # a killed writer leaves no lock and no junk behind
        again.remove([0])
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


def test_stale_copy_cannot_overwrite_a_newer_save(tmp_path):
    idx = GalleryIndex.create(info(8))
    idx.add(unit(np.eye(8)), items(8))
    idx.save(tmp_path / "idx")
    a, b = GalleryIndex.load(tmp_path / "idx"), GalleryIndex.load(tmp_path / "idx")
    a.remove([0])
    a.save()
    b.remove([1])
    with pytest.raises(StaleIndexError, match="another writer"):
        b.save()
    assert GalleryIndex.load(tmp_path / "idx").ids.tolist() == list(range(1, 8))


def test_writer_lock_times_out_with_the_holders_pid(tmp_path):
    with WriterLock(tmp_path), pytest.raises(IndexLockedError, match=str(os.getpid())):
        WriterLock(tmp_path, timeout=0.2).acquire()
    WriterLock(tmp_path, timeout=0.2).acquire().release()  # released: free again


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from reid_ssl.index import GalleryIndex, GalleryItem
    folder, w = sys.argv[1], int(sys.argv[2])
    for r in range(5):
        with GalleryIndex.open_for_update(folder) as idx:
            x = np.full((3, 8), 0.01, np.float32); x[:, w] = 1.0 + r
            idx.add(x, [GalleryItem(path=f"/w{w}/r{r}/{i}.jpg", pid=w) for i in range(3)])
""")


def test_concurrent_writers_cannot_corrupt_the_index(tmp_path):
    folder = tmp_path / "idx"
    GalleryIndex.create(info(8), "flat").save(folder)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(w)], env=ENV) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    idx = GalleryIndex.load(folder)
    assert idx.ntotal == 60 and len(set(idx.ids.tolist())) == 60 and idx._index.ntotal == 60
    meta = idx.items(idx.ids)
    assert sorted(m["path"] for m in meta.values()) == sorted(
        f"/w{w}/r{r}/{i}.jpg" for w in range(4) for r in range(5) for i in range(3)
    )
    for row, i in zip(idx.vectors, idx.ids, strict=True):  # each vector still belongs to its metadata
        assert int(np.argmax(row)) == meta[int(i)]["pid"]
    assert current_generation(folder) == 21


def test_readers_never_see_a_half_written_index(tmp_path):
    folder = tmp_path / "idx"
    idx = GalleryIndex.create(info(16), "flat")
    idx.add(unit(np.random.default_rng(0).standard_normal((500, 16))), items(500))
    idx.save(folder)
    stop, seen, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                r = GalleryIndex.load(folder)
                assert r.ntotal == r._index.ntotal == len(r.items(r.ids))
                seen.append(r.ntotal)
            except Exception as e:
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for step in range(15):
        with GalleryIndex.open_for_update(folder) as w:
            w.add(unit(np.ones((10, 16))), items(10, start=500 + 10 * step))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(seen) > 5 and set(seen) <= {500 + 10 * s for s in range(16)}


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


def test_calibrate_threshold_separable():
    cal = calibrate_threshold(np.array([0.8, 0.85, 0.9]), np.array([0.3, 0.4, 0.5]))
    assert 0.5 < cal["threshold"] < 0.8 and cal["tpr"] == 1.0 and cal["fpr"] == 0.0 and cal["auc"] == 1.0


def test_an_unreliable_calibration_gives_no_threshold():
    """Overlapping true and impostor scores (Youden J < 0.5) must not produce confident "No match" verdicts."""
    rng = np.random.default_rng(0)
    cal = calibrate_threshold(rng.normal(0.95, 0.02, 200), rng.normal(0.95, 0.02, 200))
    assert cal["youden_j"] < 0.5 and cal["reliable"] is False
    idx = GalleryIndex.create(info(32), "flat")
    idx.set_calibration(cal)
    assert idx.threshold is None and describe_calibration(cal).startswith("off:")
    good = calibrate_threshold(np.array([0.9, 0.95, 0.97]), np.array([0.5, 0.6, 0.7]))
    idx.set_calibration(good)
    assert good["reliable"] and idx.threshold == good["threshold"]
    assert describe_calibration(None) == "not calibrated" and describe_calibration(good).startswith("0.8")


def test_calibrate_threshold_maximises_youden_j_by_brute_force():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.7, 0.1, 300), rng.normal(0.5, 0.1, 400)
    cal = calibrate_threshold(pos, neg)
    every_cut = np.concatenate([pos, neg, [np.inf]])  # J only changes at observed scores
    j = (pos[None] >= every_cut[:, None]).mean(1) - (neg[None] >= every_cut[:, None]).mean(1)
    assert cal["youden_j"] == pytest.approx(j.max(), abs=1e-9)
    assert cal["youden_j"] == pytest.approx((pos >= cal["threshold"]).mean() - (neg >= cal["threshold"]).mean())


def test_open_set_scores_by_hand():
    # gallery: pid 1 cam 1, pid 1 cam 2, pid 2 cam 2, junk (-1)
    g = unit(np.array([[1, 0, 0], [0.9, 0.1, 0], [0.5, 0.5, 0], [1, 0, 0.01]]))
    q = unit(np.array([[1, 0, 0]]))
    pos, neg = open_set_scores(q, np.array([1]), np.array([1]), g, np.array([1, 1, 2, -1]), np.array([1, 2, 2, 1]))
    # same pid + same cam (row 0) and junk (row 3) are ignored: present -> row 1, removed -> row 2
    np.testing.assert_allclose(pos, [g[1] @ q[0]], atol=1e-6)
    np.testing.assert_allclose(neg, [g[2] @ q[0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Building from images: embedder identity, resume, torchrun shards, CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One Market tree, checkpoint and index (built through the library) shared by read-only tests."""
    root = tmp_path_factory.mktemp("built")
    ckpt = write_checkpoint(root / "ckpt.pt")
    tree = write_market_tree(root / "market")
    res = build_index(load_embedder(ckpt, device="cpu"), gallery_source(tree), root / "idx", checkpoint=ckpt)
    return {"root": root, "checkpoint": ckpt, "tree": tree, "index": root / "idx", "result": res}


def test_build_calibrates_and_refuses_another_embedder(tmp_path, built):
    checkpoint, market_tree, res = built["checkpoint"], built["tree"], built["result"]
    embedder = load_embedder(checkpoint, device="cpu")
    assert res["n_indexed"] == 36 and isinstance(res["calibration"], dict)
    assert res["calibration"]["source"] == "5 queries"
    idx = GalleryIndex.load(built["index"])
    assert idx.threshold == res["threshold"] and idx.manifest["embedder"]["checkpoint"] == str(checkpoint.resolve())
    idx.check_embedder(embedder)
    other = load_embedder(write_checkpoint(tmp_path / "other.pt", seed=1), device="cpu")
    with pytest.raises(EmbedderMismatchError, match="rebuild the index"):
        idx.check_embedder(other)
    resized = load_embedder(write_checkpoint(tmp_path / "tall.pt", height=96), device="cpu")
    with pytest.raises(EmbedderMismatchError, match="'height': 64"):
        idx.check_embedder(resized)
    with pytest.raises(EmbedderMismatchError):
        idx.search_embedded(other, [idx.items([0])[0]["path"]])
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(embedder, gallery_source(market_tree), built["index"])


def test_interrupted_build_resumes_without_redoing_chunks(tmp_path, checkpoint, image_folder):
    embedder = load_embedder(checkpoint, device="cpu")
    src = gallery_source(image_folder)
    src.items = src.items[:12]
    opt = BuildOptions(chunk_size=4, calibrate=False)
    real, calls, armed = embedder.embed_images, [], [True]

    def dies_on_second_chunk(paths, **kw):
        calls.append(list(paths))
        if len(calls) == 2 and armed[0]:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does in the middle of a build
        return real(paths, **kw)

    embedder.embed_images = dies_on_second_chunk
    with pytest.raises(KeyboardInterrupt):
        build_index(embedder, src, tmp_path / "idx", opt)
    assert len(list((tmp_path / "idx" / ".build").glob("chunk-*.npz"))) == 1
    assert not (tmp_path / "idx" / "CURRENT").exists()
    calls.clear()
    armed[0] = False
    res = build_index(embedder, src, tmp_path / "idx", opt)
    assert calls == [[it.path for it in src.items[4:8]], [it.path for it in src.items[8:]]]  # chunk 0 not redone
    assert res["resumed_chunks"] == 1 and res["n_indexed"] == 12
    assert not (tmp_path / "idx" / ".build").exists()
    idx = GalleryIndex.load(tmp_path / "idx")
    assert [m["path"] for m in idx.items(idx.ids).values()] == [it.path for it in src.items]
    np.testing.assert_allclose(idx.vectors, real([it.path for it in src.items]).features, atol=1e-5)


def test_build_reports_corrupt_images_and_keeps_going(tmp_path, checkpoint, image_folder):
    (image_folder / "0001" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "0002" / "empty.png").write_bytes(b"")
    res = build_index(load_embedder(checkpoint, device="cpu"), gallery_source(image_folder), tmp_path / "idx")
    assert res["n_indexed"] == 30 and res["n_failed"] == 2
    assert {Path(p).name for p, _ in res["failures"]} == {"broken.jpg", "empty.png"}


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reid_ssl.cli", *argv], env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_sigkilled_cli_build_resumes(tmp_path, checkpoint, image_folder):
    out = tmp_path / "idx"
    argv = [
        "index",
        "build",
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(image_folder),
        "--out",
        str(out),
        "--chunk-size",
        "2",
        "--batch-size",
        "2",
        "--json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reid_ssl.cli", *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list((out / ".build").glob("chunk-*.npz"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "CURRENT").exists()
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert res["resumed_chunks"] >= 3 and res["embedded_chunks"] == 15 - res["resumed_chunks"]
    assert res["n_indexed"] == 30



@pytest.mark.slow
def test_torchrun_two_cpu_ranks_merge_into_the_single_process_index(tmp_path, checkpoint, market_tree):
    common = ["--checkpoint", str(checkpoint), "--images", str(market_tree), "--chunk-size", "5", "--json"]
    single = run_cli("index", "build", "--out", str(tmp_path / "one"), *common)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "reid_ssl.cli",
            "index",
            "build",
            "--out",
            str(tmp_path / "two"),
            "--device",
            "cpu",
            *common,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    res = json.loads(dist.stdout)
    assert res["world_size"] == 2 and res["n_indexed"] == 36 and res["chunks"] == 8
    a, b = GalleryIndex.load(tmp_path / "one"), GalleryIndex.load(tmp_path / "two")
    assert a.ids.tolist() == b.ids.tolist()
    assert [m["path"] for m in a.items(a.ids).values()] == [m["path"] for m in b.items(b.ids).values()]
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-5)


def test_cli_build_info_search_add_remove(tmp_path, built, capsys):
    checkpoint, market_tree = built["checkpoint"], built["tree"]
    out = str(tmp_path / "idx")
    assert (
        cli.main(
            ["index", "build", "--checkpoint", str(checkpoint), "--images", str(market_tree), "--out", out, "--json"]
        )
        == 0
    )
    built = json.loads(capsys.readouterr().out)
    assert built["n_indexed"] == 36 and built["index_type"] == "flat"

    assert cli.main(["index", "info", "--index", out, "--json"]) == 0
    info_ = json.loads(capsys.readouterr().out)
    assert info_["ntotal"] == 36 and info_["cameras"] == [1, 2, 3] and info_["threshold"] == built["threshold"]

    query = sorted((market_tree / "query").iterdir())[0]  # pid 11, camera 1
    assert (
        cli.main(
            ["index", "search", "--index", out, "--query", str(query), "-k", "4", "--exclude-camera", "1", "--json"]
        )
        == 0
    )
    found = json.loads(capsys.readouterr().out)["queries"][0]
    assert len(found["results"]) == 4 and all(r["camid"] != 1 for r in found["results"])
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and found["match"] in (True, False)

    new = write_person_image(tmp_path / "more" / "0099_c4s1_000001_00.jpg", 99, np.random.default_rng(9))
    assert cli.main(["index", "add", str(new.parent), "--index", out, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["added"] == 1 and added["ids"] == [36] and added["ntotal"] == 37
    assert cli.main(["index", "add", str(new), "--index", out, "--json"]) == 0  # same path again: skipped
    assert json.loads(capsys.readouterr().out)["added"] == 0

    assert cli.main(["index", "remove", "--index", out, "--path-prefix", str(new.parent), "--ids", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 2
    assert GalleryIndex.load(out).ntotal == 35


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "build", "--images", "NOPE_DIR", "--out", "X"], "no such image folder"),
        (["index", "info", "--index", "NOPE_IDX"], "index not found"),
        (["index", "search", "--index", "IDX", "--query", "NOPE.jpg"], "query image not found"),
        (["index", "remove", "--index", "IDX"], "nothing to remove"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, built, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(built["index"]) if a == "IDX" else a for a in argv]
    if argv[1] == "build":
        argv = [*argv, "--checkpoint", str(built["checkpoint"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("k", ["0", "-3", "100000"])
def test_cli_rejects_absurd_k(k, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["index", "search", "--query", "q.jpg", "-k", k])
    assert e.value.code == 2 and "-k" in capsys.readouterr().err


def test_cli_search_with_another_checkpoint_is_refused(tmp_path, built, capsys):
    out = built["index"]
    other = write_checkpoint(tmp_path / "other.pt", seed=3)
    query = sorted((built["tree"] / "query").iterdir())[0]
    assert cli.main(["index", "search", "--index", str(out), "--query", str(query), "--checkpoint", str(other)]) == 2
    assert "rebuild the index" in capsys.readouterr().err
