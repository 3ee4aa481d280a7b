"""Untrusted and damaged indexes, concurrent writers, kills and full disks: the gallery index stays whole.

* index files are data, never pickle, and a planted pickle is refused (or ignored and redone);
* a wrong, newer, damaged or other-embedder index gives one clear error;
* two writing processes lose no update, readers never see half a generation;
* ``SIGKILL`` in the middle of a build or an add leaves the last published index, and the work can be redone;
* a full disk leaves the previous generation published.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.index import (
    BuildOptions,
    EmbedderMismatchError,
    GalleryIndex,
    GalleryItem,
    IndexFormatError,
    StaleIndexError,
    build_index,
    current_generation,
    gallery_source,
)
from reid_ssl.index import build as index_mod
from tests.helpers import (
    FAKE_EMBEDDER,
    SUBPROCESS_ENV,
    FakeEmbedder,
    SmallDisk,
    assert_consistent,
    assert_live,
    assert_one_clear_line,
    build_market_index,
    evil,
    full_disk_error,
    index_info,
    run_cli,
    small_index,
    write_checkpoint,
    write_person_image,
)
from tests.index.writers import WRITER_CODE


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return build_market_index(tmp_path_factory.mktemp("market"))


# ---------------------------------------------------------------------------------------------------------
# Untrusted files
# ---------------------------------------------------------------------------------------------------------


def test_symlink_leaving_the_gallery_folder_is_not_indexed(tmp_path):
    """(At serving time the app shows a placeholder for such a file: tests/app/test_serve.py.)"""
    outside = write_person_image(tmp_path / "private" / "holiday.jpg", 3, np.random.default_rng(1), size=(96, 48))
    gallery = tmp_path / "gallery"
    for i in range(3):
        write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
    (gallery / "sneaky.jpg").symlink_to(outside)
    src = gallery_source(gallery)
    assert len(src.items) == 3 and "outside the gallery folder" in src.skipped[0][1]


def _evil_index(tmp: Path, what: str, marker: Path) -> Path:
    folder = tmp / "idx"
    small_index(folder)
    gen = folder / "gen-00000001"
    if what == "manifest":
        (gen / "manifest.json").write_bytes(evil("pickle", marker))
    else:
        (gen / what).write_bytes(evil("npy", marker))
        manifest = json.loads((gen / "manifest.json").read_text())
        manifest["files"][what] = (gen / what).stat().st_size  # sizes match: only the format can refuse it
        (gen / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("where", ["index-ids.npy", "index-vectors.npy", "index-manifest", "index-build-chunk"])
def test_untrusted_pickle_that_would_create_a_file_is_refused(tmp_path, where):
    """(Checkpoints: tests/test_checkpoint_safety.py.)"""
    kind = "pickle" if where == "index-manifest" else "npy"
    assert_live(kind, tmp_path)
    marker = tmp_path / "created-by-the-pickle"
    if where != "index-build-chunk":
        folder = _evil_index(tmp_path, where.removeprefix("index-"), marker)
        with pytest.raises(IndexFormatError):
            GalleryIndex.load(folder)
        code, _, err = run_cli(["index", "info", "--index", str(folder)])
        assert_one_clear_line(code, err, str(folder))
    else:
        gallery = tmp_path / "g"
        for i in range(6):
            write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
        src, opt = gallery_source(gallery), BuildOptions(chunk_size=3, calibrate=False)
        with pytest.raises(KeyboardInterrupt):  # leave an unfinished build with its plan

            class Dies(FakeEmbedder):
                def embed_images(self, *a, **k):
                    raise KeyboardInterrupt

            build_index(Dies(), src, tmp_path / "idx", opt)
        (tmp_path / "idx" / ".build" / "chunk-000000.npz").write_bytes(evil("npy", marker))
        res = build_index(FakeEmbedder(), src, tmp_path / "idx", opt)
        assert res["n_indexed"] == 6 and res["embedded_chunks"] == 2  # the planted chunk was redone, not loaded
    assert not marker.exists()


def test_untrusted_index_metadata_is_data_never_pickle(tmp_path):
    folder = tmp_path / "idx"
    gallery = tmp_path / "g"
    for i in range(6):
        write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
    build_index(FakeEmbedder(), gallery_source(gallery), folder, BuildOptions(chunk_size=3, calibrate=False))
    (folder / ".build").mkdir()  # and an unfinished build's files
    index_mod.write_chunk(index_mod.chunk_path(folder / ".build", 0), np.ones((2, 16)), [0, 1], [(2, "bad")])
    seen = set()
    for path in (p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not data.startswith(b"\x80"), f"{path} looks like a pickle"
        kind = path.suffix or path.name
        seen.add(kind)
        if kind == ".json":
            json.loads(data)
        elif kind == ".npy":
            np.load(path, allow_pickle=False)
        elif kind == ".npz":
            with np.load(path, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif kind == ".sqlite":
            assert data.startswith(b"SQLite format 3\x00")
        elif kind == ".faiss":
            import faiss

            faiss.read_index(str(path))
        else:
            assert kind in ("CURRENT", ".lock") and data.decode().strip(), path
    assert {".json", ".npy", ".npz", ".sqlite", ".faiss", "CURRENT"} <= seen


def test_untrusted_wrong_format_or_other_embedder_gives_a_clear_error(tmp_path, market):
    """Wrong format, newer format, damaged file, another embedder's weights (its sha256 fingerprint)."""
    folder = tmp_path / "idx"
    small_index(folder)
    manifest_path = folder / "gen-00000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for change, message in [
        ({"format": "something.else"}, "not a reid_ssl index"),
        ({"format_version": 99}, "newer than this"),
        ({"files": {**manifest["files"], "ids.npy": 1}}, "the manifest says 1"),
    ]:
        manifest_path.write_text(json.dumps({**manifest, **change}))
        with pytest.raises(IndexFormatError, match=message):
            GalleryIndex.load(folder)
        code, _, err = run_cli(["index", "info", "--index", str(folder)])
        assert_one_clear_line(code, err, message)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EmbedderMismatchError, match="rebuild the index"):
        GalleryIndex.load(folder).check_embedder(FakeEmbedder())
    other = write_checkpoint(tmp_path / "other-weights.pt", seed=3)
    code, _, err = run_cli(
        [
            "index",
            "search",
            "--index",
            str(market.index),
            "--query",
            str(market.queries()[0]),
            "--checkpoint",
            str(other),
        ]
    )
    assert_one_clear_line(code, err, "rebuild the index")


# ---------------------------------------------------------------------------------------------------------
# Concurrent writers and readers
# ---------------------------------------------------------------------------------------------------------


def test_concurrency_two_processes_adding_cannot_corrupt_the_index(tmp_path):
    folder = tmp_path / "idx"
    GalleryIndex.create(index_info(8), "flat").save(folder)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER_CODE, str(folder), str(w)], env=SUBPROCESS_ENV) for w in (2, 5)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    idx = assert_consistent(folder)
    assert idx.ntotal == 36 and sorted(idx.ids.tolist()) == list(range(36))  # no update lost, no id reused
    meta = idx.items(idx.ids)
    for row, i in zip(idx.vectors, idx.ids, strict=True):  # every vector still belongs to its metadata
        assert int(np.argmax(row)) == meta[int(i)]["pid"]
    assert current_generation(folder) == 13
    # the rule is enforced, not only documented: a writer that skipped the lock cannot save over a newer index
    stale = GalleryIndex.load(folder)
    with GalleryIndex.open_for_update(folder) as fresh:
        fresh.remove([0])
    stale.remove([1])
    with pytest.raises(StaleIndexError, match="another writer saved"):
        stale.save()
    assert GalleryIndex.load(folder).ntotal == 35


SAVER = textwrap.dedent("""
    import sys, time, numpy as np
    from reid_ssl.index import GalleryIndex, GalleryItem
    folder, rounds = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    for r in range(rounds):
        with GalleryIndex.open_for_update(folder) as idx:
            x = rng.standard_normal((500, 32)).astype(np.float32)
            idx.add(x, [GalleryItem(path=f"/{r}/{i}") for i in range(500)])
        time.sleep(0.05)
""")


def test_concurrency_readers_never_see_a_half_written_index(tmp_path):
    folder = tmp_path / "idx"
    small_index(folder, n=500, dim=32)
    writer = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), "12"], env=SUBPROCESS_ENV)
    seen = []
    while writer.poll() is None:
        idx = assert_consistent(folder)  # never a mix of two generations, never a partial file
        seen.append(idx.ntotal)
        assert idx.ntotal % 500 == 0 and idx.generation == idx.ntotal // 500
    assert writer.returncode == 0 and assert_consistent(folder).ntotal == 6500
    assert len(set(seen)) > 2  # the reads really did overlap the writes


# ---------------------------------------------------------------------------------------------------------
# Kills and full disks
# ---------------------------------------------------------------------------------------------------------


DIE_IN_CHUNK_WRITE = FAKE_EMBEDDER + textwrap.dedent("""
    import os, signal, sys, tempfile
    from pathlib import Path
    import reid_ssl.index as idx
    import reid_ssl.index.build as m
    real = m.atomic_write_bytes
    def dying_write(path, data):  # killed half-way through writing the third chunk
        if Path(path).name == "chunk-000002.npz":
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    m.atomic_write_bytes = dying_write
    options = m.BuildOptions(chunk_size=3, calibrate=False)
    m.build_index(FakeEmbedder(), idx.gallery_source(sys.argv[1]), sys.argv[2], options)
""")


def test_faults_sigkill_during_index_build_leaves_no_index_and_resumes(tmp_path):
    gallery = tmp_path / "g"
    for i in range(12):
        write_person_image(gallery / f"{i:02d}.jpg", i, np.random.default_rng(i))
    (gallery / "05b.jpg").write_bytes(b"corrupt in the middle")
    out = tmp_path / "idx"
    killed = subprocess.run(
        [sys.executable, "-c", DIE_IN_CHUNK_WRITE, str(gallery), str(out)], env=SUBPROCESS_ENV, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "CURRENT").exists()  # nothing half-built was published
    assert sorted(p.name for p in (out / ".build").glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    res = build_index(FakeEmbedder(), gallery_source(gallery), out, BuildOptions(chunk_size=3, calibrate=False))
    assert res["resumed_chunks"] == 2 and res["embedded_chunks"] == 3 and res["n_indexed"] == 12
    assert res["n_failed"] == 1 and "05b.jpg" in res["failures"][0][0]  # reported, not fatal
    assert_consistent(out)
    assert not (out / ".build").exists()


DIE_IN_ADD = textwrap.dedent("""
    import os, signal, sys, numpy as np
    import reid_ssl.index as m
    from reid_ssl.index import store
    folder, where = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "mid-write":  # half of the new generation's vectors.npy on disk
        real = store.save_npy
        def half(path, array):
            if path.name == "vectors.npy":
                with open(path, "wb") as f:
                    f.write(b"\\x93NUMPY" + b"\\0" * 64)
                die()
            real(path, array)
        store.save_npy = half
    elif where == "before-commit":  # the new generation complete and renamed, CURRENT not replaced yet
        store.atomic_write_bytes = die
    else:  # "before-cleanup": CURRENT replaced, the old generations not yet collected
        calls, real_gc = [0], store.collect_garbage
        def gc(folder, keep):
            calls[0] += 1
            if calls[0] == 2:
                die()
            real_gc(folder, keep)
        store.collect_garbage = gc
    with m.GalleryIndex.open_for_update(folder) as idx:
        x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
        idx.add(x, [m.GalleryItem(path=f"/new/{i}.jpg") for i in range(5)])
""")


@pytest.mark.parametrize("where", ["mid-write", "before-commit", "before-cleanup"])
def test_faults_sigkill_during_gallery_add_keeps_the_index_and_the_add_can_be_redone(tmp_path, where):
    folder = tmp_path / "idx"
    small_index(folder)
    killed = subprocess.run([sys.executable, "-c", DIE_IN_ADD, str(folder), where], env=SUBPROCESS_ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    idx = assert_consistent(folder)
    committed = where == "before-cleanup"
    assert idx.ntotal == (13 if committed else 8) and idx.generation == (2 if committed else 1)
    with GalleryIndex.open_for_update(folder, timeout=5) as again:  # the dead writer left no stale lock
        if not committed:
            again.add(np.ones((5, 8), np.float32), [GalleryItem(path=f"/new/{i}.jpg") for i in range(5)])
        again.remove([0])
    final = assert_consistent(folder)
    assert final.ntotal == 12
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in ("CURRENT", ".lock"))
    assert leftovers == [f"gen-{final.generation - 1:08d}", f"gen-{final.generation:08d}"]  # junk collected


def test_faults_full_disk_during_index_save_keeps_the_previous_index(tmp_path, market):
    with SmallDisk(tmp_path / "disk") as small_disk:
        folder = small_disk.folder / "idx"
        idx = small_index(folder)
        idx.add(np.ones((8000, 8), np.float32), [GalleryItem(path=f"/big/{i}") for i in range(8000)])
        with small_disk.full(), pytest.raises(OSError) as e:
            idx.save()
        full_disk_error(e, f"could not save the index to {folder}")
        assert "generation 1 is still the published one" in str(e.value)
        assert assert_consistent(folder).ntotal == 8
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "CURRENT", "gen-00000001"]
        idx.save()  # the same object saves once there is room again
        assert assert_consistent(folder).ntotal == 8008
        # the CLI says it in one line, and the index stays as it was
        src = gallery_source(market.tree / "query")
        real = build_index(market.embedder, src, small_disk.folder / "real", checkpoint=market.checkpoint)
        assert real["n_indexed"] == 5
        img = write_person_image(small_disk.folder / "new" / "0099_c1s1_000001_00.jpg", 99, np.random.default_rng(9))
        with small_disk.full(leave=4096):
            code, _, err = run_cli(["index", "add", str(img), "--index", str(small_disk.folder / "real")])
        assert_one_clear_line(code, err, "could not save the index")
        assert GalleryIndex.load(small_disk.folder / "real").ntotal == 5
