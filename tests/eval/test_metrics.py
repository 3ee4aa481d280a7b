"""reid_ssl.evaluate: equality with torchreid, the tie rule, streaming == dense, figures and the eval pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_ssl.data.torchreid_bridge import import_torchreid
from reid_ssl.eval import rerank as rerank_module
from reid_ssl.eval.distances import distance_matrix, evaluate_features
from reid_ssl.eval.figures import CORRECT, QUERY, WRONG, ranked_strip
from reid_ssl.eval.metrics import evaluate_rank
from reid_ssl.eval.reid import evaluate_checkpoint
from reid_ssl.eval.rerank import rerank_distances


def random_case(
    nq: int, ng: int, nid: int, ncam: int, seed: int, dtype: type = np.float32, levels: int | None = None
) -> tuple[np.ndarray, ...]:
    """Random distances; gallery ids include -1 (junk-like) and 0 (distractor); ``levels`` makes ties."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, nid, nq)
    g_pids = rng.integers(-1, nid, ng)
    q_cams, g_cams = rng.integers(0, ncam, nq), rng.integers(0, ncam, ng)
    d = rng.random((nq, ng))
    if levels:
        d = np.round(d * levels) / levels
    return d.astype(dtype), q_pids, g_pids, q_cams, g_cams


def reference(
    distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray, max_rank: int
) -> dict[str, float | np.ndarray]:
    """Loop written from the protocol: stable sort by (distance, is-true-match), i.e. the pessimistic rule."""
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        d, match = distmat[i][keep], (g_pids[keep] == q_pids[i])
        if not match.any():
            continue
        order = np.lexsort((match, d))  # by distance, true matches last among equals
        hits = match[order]
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        cmc = np.zeros(min(max_rank, distmat.shape[1]))
        cmc[ranks[0] - 1 :] = 1
        cmcs.append(cmc)
    return {"cmc": np.mean(cmcs, 0), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps))}


@pytest.fixture(scope="module")
def torchreid():
    return import_torchreid()


# ---------------------------------------------------------------------------------------------------------
# evaluate_rank
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("nq", "ng", "nid", "ncam", "max_rank", "seed"),
    [
        (40, 300, 20, 3, 50, 0),
        (120, 900, 40, 6, 20, 1),
        (60, 200, 6, 2, 50, 2),  # many true matches per query (sort path)
        (25, 40, 5, 2, 50, 3),  # gallery smaller than max_rank: CMC cut to the gallery size
    ],
)
def test_equals_torchreid_on_random_matrices(torchreid, dtype, nq, ng, nid, ncam, max_rank, seed) -> None:
    d, qp, gp, qc, gc = random_case(nq, ng, nid, ncam, seed, dtype)
    if ng < max_rank:  # torchreid crashes (ragged CMC) when junk leaves a row shorter than max_rank
        qc, gc = np.zeros_like(qc), np.ones_like(gc)
    ref_cmc, ref_map = torchreid.metrics.evaluate_rank(d, qp, gp, qc, gc, max_rank=max_rank)
    ours = evaluate_rank(d, qp, gp, qc, gc, max_rank=max_rank)
    assert ours["cmc"].shape == np.asarray(ref_cmc).shape == (min(max_rank, ng),)
    np.testing.assert_allclose(ours["cmc"], ref_cmc, atol=1e-6, rtol=0)
    assert ours["mAP"] == pytest.approx(ref_map, abs=1e-6)
    np.testing.assert_allclose(ours["mINP"], reference(d, qp, gp, qc, gc, max_rank)["mINP"], atol=1e-12)


def test_short_rows_pad_the_cmc_instead_of_crashing() -> None:
    d, qp, gp, qc, gc = random_case(25, 40, 5, 2, seed=3)
    ours = evaluate_rank(d, qp, gp, qc, gc, max_rank=50)
    ref = reference(d, qp, gp, qc, gc, 50)
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], atol=1e-12)
    assert ours["cmc"][-1] == 1.0


def test_market_style_junk_and_distractor_ids(torchreid) -> None:
    """Queries with pid 0 or -1 and a gallery dominated by 0000 distractors and -1 boxes."""
    rng = np.random.default_rng(7)
    g_pids = np.concatenate([np.zeros(150, int), -np.ones(50, int), rng.integers(1, 30, 300)])
    q_pids = np.concatenate([[0, -1], rng.integers(1, 30, 78)])
    qc, gc = rng.integers(0, 6, 80), rng.integers(0, 6, 500)
    d = rng.random((80, 500)).astype(np.float32)
    ref_cmc, ref_map = torchreid.metrics.evaluate_rank(d, q_pids, g_pids, qc, gc)
    ours = evaluate_rank(d, q_pids, g_pids, qc, gc)
    np.testing.assert_allclose(ours["cmc"], ref_cmc, atol=1e-6, rtol=0)
    assert ours["mAP"] == pytest.approx(ref_map, abs=1e-6)


@pytest.mark.parametrize("levels", [3, 10])
def test_tie_rule_matches_torchreid_with_wrong_matches_first(torchreid, levels) -> None:
    """With ties, torchreid's order is arbitrary; pushing true matches behind equal distances reproduces ours."""
    d, qp, gp, qc, gc = random_case(80, 400, 12, 3, seed=levels, dtype=np.float64, levels=levels)
    assert len(np.unique(d)) <= levels + 1  # really tied
    tie_broken = d + 1e-9 * (qp[:, None] == gp[None, :])
    ref_cmc, ref_map = torchreid.metrics.evaluate_rank(tie_broken, qp, gp, qc, gc)
    ours = evaluate_rank(d, qp, gp, qc, gc)
    np.testing.assert_allclose(ours["cmc"], ref_cmc, atol=1e-6, rtol=0)
    assert ours["mAP"] == pytest.approx(ref_map, abs=1e-6)
    ref = reference(d, qp, gp, qc, gc, 50)
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], atol=1e-12)
    assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)


def test_tie_rule_is_independent_of_gallery_order() -> None:
    d, qp, gp, qc, gc = random_case(50, 300, 10, 3, seed=11, levels=4)
    perm = np.random.default_rng(0).permutation(300)
    a, b = evaluate_rank(d, qp, gp, qc, gc), evaluate_rank(d[:, perm], qp, gp[perm], qc, gc[perm])
    np.testing.assert_array_equal(a["cmc"], b["cmc"])
    assert a["mAP"] == b["mAP"] and a["mINP"] == b["mINP"]


def test_toy_query_by_hand() -> None:
    # gallery: wrong (0.1), true (0.2), junk = same pid+cam (0.05), true (0.4), wrong tied with last true (0.4)
    d = np.array([[0.1, 0.2, 0.05, 0.4, 0.4]])
    g_pids, g_cams = np.array([9, 1, 1, 1, 8]), np.array([1, 1, 0, 2, 1])
    r = evaluate_rank(d, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=5)
    # kept order: wrong, TRUE, wrong(tie, first), TRUE -> true-match ranks 2 and 4
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1])  # length min(max_rank, num_gallery)
    assert r["first_match_rank"].tolist() == [2]


def test_skipped_queries_and_errors() -> None:
    d = np.random.default_rng(0).random((3, 4))
    g_pids, g_cams = np.array([1, 1, 2, 3]), np.array([0, 1, 0, 0])
    # query 0 has a true match; query 1's only same-pid item shares its camera (junk); query 2's pid is absent
    r = evaluate_rank(d, np.array([1, 2, 7]), g_pids, np.array([0, 0, 0]), g_cams)
    assert r["num_valid_queries"] == 1
    assert np.isnan(r["AP"][1]) and np.isnan(r["AP"][2]) and r["first_match_rank"].tolist()[1:] == [0, 0]
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(d, np.array([2, 2, 7]), g_pids, np.array([0, 0, 0]), g_cams)
    with pytest.raises(ValueError, match="g_pids has 3 entries"):
        evaluate_rank(d, np.array([1, 2, 7]), g_pids[:3], np.array([0, 0, 0]), g_cams)
    bad = d.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, np.array([1, 2, 7]), g_pids, np.array([0, 0, 0]), g_cams)


def test_accepts_torch_tensors_and_thread_counts_agree() -> None:
    d, qp, gp, qc, gc = random_case(70, 500, 15, 4, seed=5)
    a = evaluate_rank(torch.from_numpy(d), torch.from_numpy(qp), gp, qc, gc, num_threads=1)
    b = evaluate_rank(d, qp, gp, qc, gc, num_threads=3)
    np.testing.assert_array_equal(a["cmc"], b["cmc"])
    np.testing.assert_array_equal(a["AP"], b["AP"])


def test_much_faster_than_torchreid(torchreid) -> None:
    d, qp, gp, qc, gc = random_case(400, 4000, 100, 6, seed=9)
    t = time.perf_counter()
    torchreid.metrics.evaluate_rank(d, qp, gp, qc, gc)
    ref_s = time.perf_counter() - t
    ours_s = min(_timed(lambda: evaluate_rank(d, qp, gp, qc, gc)) for _ in range(3))
    assert ours_s * 10 < ref_s, (ours_s, ref_s)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------
# Streaming evaluation
# ---------------------------------------------------------------------------------------------------------


def feature_case(nq: int, ng: int, dim: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    qp, gp = rng.integers(0, 25, nq), rng.integers(-1, 25, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    return (
        rng.standard_normal((nq, dim)).astype(np.float32),
        rng.standard_normal((ng, dim)).astype(np.float32),
        qp,
        gp,
        qc,
        gc,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("block", [97, 1000, 5000])
def test_streaming_equals_dense(metric, block) -> None:
    qf, gf, qp, gp, qc, gc = feature_case(60, 2500, 16, seed=block)
    dense = evaluate_rank(distance_matrix(qf, gf, metric), qp, gp, qc, gc)
    stream = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, block_size=block)
    np.testing.assert_allclose(stream["cmc"], dense["cmc"], atol=1e-12)
    assert stream["mAP"] == pytest.approx(dense["mAP"], abs=1e-6)
    assert stream["mINP"] == pytest.approx(dense["mINP"], abs=1e-6)


def test_distance_matrix_matches_torchreid(torchreid) -> None:
    qf, gf, *_ = feature_case(20, 50, 8, seed=1)
    for metric in ("cosine", "euclidean"):
        ref = torchreid.metrics.compute_distance_matrix(torch.from_numpy(qf), torch.from_numpy(gf), metric).numpy()
        np.testing.assert_allclose(distance_matrix(qf, gf, metric), ref, atol=1e-4)


def test_streaming_topk_equals_faiss_and_skips_junk(tmp_path: Path) -> None:
    import faiss

    qf, gf, qp, gp, qc, gc = feature_case(40, 3000, 16, seed=3)
    qn, gn = qf.copy(), gf.copy()
    faiss.normalize_L2(qn)
    faiss.normalize_L2(gn)
    np.save(tmp_path / "g.npy", gn)
    gallery = np.load(tmp_path / "g.npy", mmap_mode="r")  # a memory-mapped gallery streams too
    # no junk: every same-pid gallery item is on another camera
    gc = np.where(gp[None, :] == qp[:, None], (qc[:, None] + 1) % 3, gc[None, :]).max(0)
    ok = ~((gp[None, :] == qp[:, None]) & (gc[None, :] == qc[:, None])).any(1)
    qn, qp, qc = qn[ok], qp[ok], qc[ok]
    res = evaluate_features(qn, gallery, qp, gp, qc, gc, topk=10, block_size=700)
    _, ref_idx = faiss.knn(qn, gn, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(res["topk_indices"], ref_idx)
    # with junk present, junk never appears in the lists
    gc2 = gc.copy()
    gc2[gp == qp[0]] = qc[0]
    res2 = evaluate_features(qn, gn, qp, gp, qc, gc2, topk=50, block_size=500)
    assert not np.isin(res2["topk_indices"][0], np.flatnonzero(gp == qp[0])).any()


def test_streaming_sysu_like_one_true_match_among_distractors() -> None:
    rng = np.random.default_rng(0)
    qf = rng.standard_normal((30, 32)).astype(np.float32)
    gf = rng.standard_normal((4000, 32)).astype(np.float32)
    gf[:30] = qf + 0.3 * rng.standard_normal((30, 32)).astype(np.float32)
    gp = np.full(4000, -1000)
    gp[:30] = np.arange(30)
    res = evaluate_features(qf, gf, np.arange(30), gp, np.ones(30, int), np.zeros(4000, int), block_size=512)
    sims = (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (gf / np.linalg.norm(gf, axis=1, keepdims=True)).T
    expected_rank = (sims >= sims[np.arange(30), np.arange(30)][:, None]).sum(1)  # pessimistic ties
    np.testing.assert_array_equal(res["first_match_rank"], expected_rank)
    assert res["mAP"] == pytest.approx(np.mean(1 / expected_rank))  # one true match: AP = 1 / rank


# ---------------------------------------------------------------------------------------------------------
# Re-ranking, figures, pipeline
# ---------------------------------------------------------------------------------------------------------


def test_rerank_refuses_when_memory_is_short(monkeypatch) -> None:
    qf, gf, *_ = feature_case(10, 40, 8, seed=0)
    monkeypatch.setattr(rerank_module, "available_memory_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="run without --rerank"):
        rerank_distances(qf, gf)
    monkeypatch.setattr(rerank_module, "available_memory_bytes", lambda: 1 << 40)
    d = rerank_distances(qf, gf)
    assert d.shape == (10, 40) and np.isfinite(d).all()


def test_strip_colours(tmp_path: Path, image_folder: Path) -> None:
    img = str(next(image_folder.rglob("*.jpg")))
    path = ranked_strip((img, 1, 0), [(img, 1, 1), (img, 2, 1)], tmp_path / "s.png", size=(40, 80))
    px = Image.open(path).convert("RGB")
    assert px.size == (40 * 3 + 12, 80 + 14)
    assert px.getpixel((1, 1)) == QUERY
    assert px.getpixel((40 + 12 + 1, 1)) == CORRECT
    assert px.getpixel((80 + 12 + 1, 1)) == WRONG


def test_pipeline_writes_numbers_plots_and_uses_the_cache(tmp_path, checkpoint, market_tree, monkeypatch) -> None:
    out = tmp_path / "out"
    res = evaluate_checkpoint(checkpoint, "market-layout", market_tree, out_dir=out, num_strips=3, strip_topk=5)
    saved = json.loads((out / "eval_market-layout.json").read_text())
    assert saved["rank1"] == res["rank1"] and 0 <= res["mAP"] <= 1 and len(saved["cmc"]) == 33
    assert res["num_query"] == 5 and res["num_gallery"] == 5 * 3 * 2 + 3  # -1 junk files are dropped
    assert Path(res["files"]["cmc_png"]).stat().st_size > 0 and len(res["files"]["strips"]) == 3
    assert Image.open(res["files"]["strips"][0]).size == (64 * 6 + 12, 128 + 14)
    assert res["cache"] == {"query": False, "gallery": False}

    from reid_ssl.embedder import Embedder

    def no_embedding(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(Embedder, "embed_images", no_embedding)
    again = evaluate_checkpoint(checkpoint, "market-layout", market_tree, out_dir=out, num_strips=0, streaming=True)
    assert again["cache"] == {"query": True, "gallery": True} and again["mode"] == "streaming"
    assert again["mAP"] == pytest.approx(res["mAP"], abs=1e-6) and again["cmc"] == pytest.approx(res["cmc"])
    # the rerun wrote no strips: the three of the result it replaced are gone, not left to be mistaken for its own
    assert again["files"]["strips"] == [] and not list((out / "ranked_market-layout").glob("*.png"))


def test_pipeline_reports_unreadable_images(tmp_path, checkpoint, market_tree) -> None:
    broken = sorted((market_tree / "bounding_box_test").glob("0012_*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    res = evaluate_checkpoint(checkpoint, "market-layout", market_tree, out_dir=tmp_path, num_strips=0)
    assert [f["image"] for f in res["failures"]["gallery"]] == [str(broken)]
    assert res["num_gallery"] == 32
    with pytest.raises(ValueError, match="could not be read"):  # a cache hit: the sidecar keeps the failures
        evaluate_checkpoint(checkpoint, "market-layout", market_tree, out_dir=tmp_path, strict=True)


def test_pipeline_on_a_sysu30k_tree_streams(tmp_path, checkpoint) -> None:
    from tests.helpers import write_person_image

    rng = np.random.default_rng(0)
    base = tmp_path / "sysu_test_set_all"
    for pid in range(28311, 28315):
        write_person_image(base / "query" / f"{pid:09d}" / f"{pid:09d}_c2_2.jpg", pid, rng)
        write_person_image(base / "gallery" / f"{pid:09d}" / f"{pid:09d}_c1_1.jpg", pid, rng)
    for n in range(6):
        write_person_image(base / "gallery" / "0000others" / f"{n:06d}.jpg", 100 + n, rng)
    res = evaluate_checkpoint(checkpoint, "sysu30k", tmp_path, out_dir=tmp_path / "o", streaming=True, num_strips=2)
    assert res["mode"] == "streaming" and res["num_gallery"] == 10 and res["num_valid_queries"] == 4
    assert any("rank-1" in note for note in res["notes"]) and len(res["files"]["strips"]) == 2
    dense = evaluate_checkpoint(checkpoint, "sysu30k", tmp_path, out_dir=tmp_path / "o", streaming=False)
    assert dense["cmc"] == pytest.approx(res["cmc"]) and dense["mAP"] == pytest.approx(res["mAP"])


def test_rank_metrics_market_protocol() -> None:
    # Query 0 (pid 1, cam 1): gallery sorted by distance = [g0 pid1 cam1 (dropped), g1 pid2, g2 pid1 cam2,
    # g3 pid1 cam2]; matches after filtering at ranks 2 and 3 -> AP = (1/2 + 2/3) / 2, rank-1 miss.
    # Query 1 (pid 3) has no valid match and is skipped.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5]])
    g_pids, g_cams = np.array([1, 2, 1, 1]), np.array([1, 1, 2, 2])
    r = evaluate_rank(distmat, np.array([1, 3]), g_pids, np.array([1, 1]), g_cams, 3)
    assert r["num_valid_queries"] == 1
    np.testing.assert_allclose(r["cmc"], [0, 1, 1])
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(distmat[1:], np.array([3]), g_pids, np.array([1]), g_cams)
