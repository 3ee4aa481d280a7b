"""An index folder on disk: stable ids across saves, formats, atomic generations, locks, killed writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from reid_ssl.errors import IndexFormatError, IndexLockedError, StaleIndexError
from reid_ssl.index import GalleryIndex, WriterLock, current_generation, store
from tests.helpers import SUBPROCESS_ENV, clustered, gallery_items, index_info, index_writer_script, unit


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_ids_stable_across_add_remove_save_load(tmp_path, name):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((30, 16)))
    idx = GalleryIndex.create(index_info(16), name)
    assert idx.add(x[:20], gallery_items(20)).tolist() == list(range(20))
    assert idx.remove([3, 4, 5, 99]) == 3
    assert idx.add(x[20:], gallery_items(10, start=20)).tolist() == list(range(20, 30))  # never reuses 3..5
    idx.save(tmp_path / "idx")
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.ids.tolist() == [i for i in range(30) if i not in (3, 4, 5)]
    for i in (0, 19, 20, 29):
        assert back.search(x[i], 1)[0][0].id == i
        assert back.items([i])[i]["path"] == f"/g/{i}.jpg"
    assert back.manifest["next_id"] == 30 and back.add(x[:1], gallery_items(1)).tolist() == [30]


def test_save_load_round_trip(tmp_path):
    x, q, _ = clustered(3000, 32)
    idx = GalleryIndex.create(index_info(32), "ivf-flat")
    idx.add(x, gallery_items(3000))
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
    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)), gallery_items(8))
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

    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)), gallery_items(8))
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


def test_failed_save_keeps_previous_index(tmp_path, monkeypatch):
    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)), gallery_items(8))
    idx.save(tmp_path / "idx")
    idx.add(unit(np.ones((1, 8))), gallery_items(1, start=8))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save_npy", disk_full)
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
    idx = GalleryIndex.create(index_info(64), "flat")
    idx.add(unit(np.random.default_rng(0).standard_normal((2000, 64))), gallery_items(2000))
    idx.save(folder)
    rng = np.random.default_rng(4)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(folder)], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True
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
    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)), gallery_items(8))
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


def test_concurrent_writers_cannot_corrupt_the_index(tmp_path):
    writer = index_writer_script(rounds=5)
    folder = tmp_path / "idx"
    GalleryIndex.create(index_info(8), "flat").save(folder)
    procs = [
        subprocess.Popen([sys.executable, "-c", writer, str(folder), str(w)], env=SUBPROCESS_ENV) for w in range(4)
    ]
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
    idx = GalleryIndex.create(index_info(16), "flat")
    idx.add(unit(np.random.default_rng(0).standard_normal((500, 16))), gallery_items(500))
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
            w.add(unit(np.ones((10, 16))), gallery_items(10, start=500 + 10 * step))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(seen) > 5 and set(seen) <= {500 + 10 * s for s in range(16)}


def rewrite_manifest(folder, **changes) -> None:
    """Change manifest fields of the published generation (as an older or newer reid_ssl would have written)."""
    gen = folder / (folder / "CURRENT").read_text().strip()
    manifest = json.loads((gen / "manifest.json").read_text())
    (gen / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_a_version_1_index_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    """Format 1 stored the file name's 1-based camera numbers; reading it as 0-based camids would be wrong."""
    idx = GalleryIndex.create({**index_info(8), "checkpoint": "/runs/x/checkpoint.pt"})
    idx.add(unit(np.eye(8)), gallery_items(8))
    idx.save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / "gen-00000001" / "manifest.json").read_text())["format_version"] == 2
    rewrite_manifest(tmp_path / "idx", format_version=1)
    with pytest.raises(IndexFormatError) as e:
        GalleryIndex.load(tmp_path / "idx")
    message = str(e.value)
    assert "format 1" in message and "0-based" in message and "c1 = camid 0" in message
    assert "reid_ssl index build --checkpoint /runs/x/checkpoint.pt --images" in message
    assert f"--out {tmp_path / 'idx'} --overwrite" in message
    rewrite_manifest(tmp_path / "idx", format_version=3)
    with pytest.raises(IndexFormatError, match="newer than this reid_ssl"):
        GalleryIndex.load(tmp_path / "idx")


def test_an_index_type_this_version_does_not_know_is_a_format_error(tmp_path):
    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)), gallery_items(8))
    idx.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "gen-00000001" / "manifest.json").read_text())
    rewrite_manifest(tmp_path / "idx", index={**manifest["index"], "type": "scann"})
    with pytest.raises(IndexFormatError, match="index type 'scann'"):
        GalleryIndex.load(tmp_path / "idx")
