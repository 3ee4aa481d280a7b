"""The index-type registry: every entry against brute force, factory strings, training minimums, removals."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from reid_ssl.errors import InputError
from reid_ssl.index import INDEX_TYPES, GalleryIndex, index_spec
from reid_ssl.index import types as types_mod
from reid_ssl.registry import Registry
from tests.helpers import clustered, gallery_items, hit_ids, index_info

# recall@10 each type must reach with its own default parameters on clustered data (flat: exact)
MIN_RECALL = {"flat": 1.0, "ivf-flat": 0.95, "ivf-pq": 0.90, "ivf-opq": 0.90, "hnsw": 0.95}


def recall_at_10(idx: GalleryIndex, q: np.ndarray, **kw) -> float:
    _, exact = idx.search_exact(q, 10)
    got = hit_ids(idx.search(q, 10, **kw))
    return float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)]))


def test_index_types_are_a_registry():
    assert isinstance(INDEX_TYPES, Registry) and set(MIN_RECALL) == set(INDEX_TYPES)
    for name, kind in INDEX_TYPES.items():
        assert kind.name == name and INDEX_TYPES.help(name)


@pytest.mark.parametrize("name", list(INDEX_TYPES))
def test_every_registered_type_against_brute_force(name):
    """Each entry alone decides factory, training, search parameters, re-ranking and removal: check them all.

    (Removals from IVF indexes used to return other items' ids: IDMap2 renumbered ids that IVF lists keep.)
    """
    kind = INDEX_TYPES[name]
    x, q, _ = clustered(5000, 32)
    idx = GalleryIndex.create(index_info(32), name)
    idx.add(x, gallery_items(5000))
    assert idx.spec.type == name and idx.index_type is kind
    assert recall_at_10(idx, q) >= MIN_RECALL[name], f"{name} ({idx.spec.factory})"
    assert idx.search(x[7], 1)[0][0].id == 7
    gone = np.arange(0, 5000, 3)
    assert idx.remove(gone) == len(gone) and idx.ntotal == 5000 - len(gone)
    assert idx._index.ntotal == idx.ntotal and idx.spec.type == name  # rebuilt (hnsw) or deleted in place
    assert not set(np.ravel(hit_ids(idx.search(q, 10)))) & set(gone.tolist())
    assert recall_at_10(idx, q) >= MIN_RECALL[name]


@pytest.mark.parametrize("name", sorted(INDEX_TYPES))
def test_every_index_type_builds_from_its_factory_string(name):
    spec = index_spec(name, 50_000, 64)
    index = INDEX_TYPES[name].new_index(spec.factory, 64)
    assert index.d == 64 and spec.type == name and index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_unknown_index_type_lists_choices():
    with pytest.raises(KeyError, match="ivf-flat"):
        index_spec("lsh", 10, 8)


@pytest.mark.parametrize(
    ("factory", "kind", "nprobe"),
    [
        ("HNSW16,Flat", "hnsw", None),
        ("IVF64,PQ8", "ivf-pq", 32),
        ("IVF256_HNSW32,Flat", "ivf-flat", 32),
        ("PQ8", "flat", None),
    ],
)
def test_an_explicit_factory_takes_the_rules_of_the_type_that_claims_it(factory, kind, nprobe):
    spec = index_spec("auto", 10_000, 64, factory=factory)
    assert (spec.type, spec.factory, spec.nprobe) == (kind, factory, nprobe)


def test_factory_strings_faiss_refuses_are_input_errors_before_any_work():
    with pytest.raises(InputError, match="cannot build the factory string"):
        GalleryIndex.create(index_info(32), factory="IVF,Nonsense")
    x, _, _ = clustered(100, 32)
    idx = GalleryIndex.create(index_info(32), factory="IVF4096,Flat")  # more lists than vectors
    with pytest.raises(InputError, match="cannot train"):
        idx.add(x, gallery_items(100))
    assert idx.ntotal == 0


@pytest.mark.parametrize(
    ("name", "n", "min_recall"), [("ivf-flat", 20_000, 0.95), ("hnsw", 20_000, 0.95), ("ivf-pq", 3_000, 0.90)]
)
def test_approximate_index_recall_on_clustered_data(name, n, min_recall):
    x, q, _ = clustered(n, 64)
    idx = GalleryIndex.create(index_info(64), name)
    idx.add(x, gallery_items(n))
    spec = idx.spec
    if spec.nprobe:  # the approximation is real: a small share of the lists is visited
        nlist = faiss.extract_index_ivf(idx._index).nlist
        assert spec.nprobe <= nlist // 2
    recall = recall_at_10(idx, q)
    assert recall >= min_recall, f"{name} ({spec.factory}) recall@10 {recall:.3f}"
    if spec.nprobe:  # and this set can tell: visiting a single list misses many neighbours
        assert recall_at_10(idx, q, nprobe=1) < 0.9


def test_auto_type_grows_from_flat_to_ivf(monkeypatch):
    monkeypatch.setattr(types_mod, "AUTO_FLAT_FLOATS", 2000 * 32)
    x, _, _ = clustered(5000, 32)
    idx = GalleryIndex.create(index_info(32))
    idx.add(x[:1500], gallery_items(1500))
    assert idx.spec.type == "flat"
    idx.add(x[1500:], gallery_items(3500, start=1500))
    assert idx.spec.type == "ivf-flat" and idx.ntotal == 5000
    assert [r[0].id for r in idx.search(x[[10, 4000]], 1)] == [10, 4000]


def test_a_trained_type_on_a_tiny_gallery_stays_exact_until_it_can_train():
    x, _, _ = clustered(3000, 32)
    idx = GalleryIndex.create(index_info(32), "ivf-flat")
    idx.add(x[:20], gallery_items(20))
    assert idx.spec.type == "flat" and idx.search(x[3], 1)[0][0].id == 3
    idx.add(x[20:], gallery_items(2980, start=20))
    assert idx.spec.type == "ivf-flat" and idx.ntotal == 3000


@pytest.mark.parametrize(
    ("n", "dim", "kind"),
    [
        (20_000, 512, "flat"),
        (20_001, 512, "ivf-flat"),
        (40_000, 256, "flat"),
        (5_000, 2048, "flat"),
        (6_000, 2048, "ivf-flat"),
        (1_000_000, 256, "ivf-flat"),
        (4_194_304, 256, "ivf-flat"),
        (4_194_305, 256, "ivf-opq"),
        (2_200_000, 512, "ivf-opq"),
        (100_000_000, 256, "ivf-opq"),
    ],
)
def test_auto_picks_by_the_floats_one_query_scans(n, dim, kind):
    assert types_mod.resolve_type("auto", n, dim).name == kind
    assert index_spec("auto", n, dim).type == kind


def test_ivf_parameters_by_size_follow_the_measured_rule():
    spec = index_spec("ivf-flat", 1_000_000, 256)
    assert (spec.factory, spec.nprobe, spec.train_size) == ("IVF4096,Flat", 128, 64 * 4096)
    assert [types_mod.default_nprobe(n) for n in (16, 64, 512, 1024, 2048, 4096, 16384, 65536)] == [
        16, 32, 32, 64, 64, 128, 512, 2048,
    ]  # fmt: skip
    opq = index_spec("ivf-opq", 10_000_000, 256)
    assert opq.factory == "OPQ32,IVF16384,PQ32x8np" and opq.rerank == 8 and opq.nprobe == 512
    assert index_spec("ivf-pq", 1_000_000, 256).rerank == 32
    assert index_spec("auto", 50_000, 64, factory="OPQ16,IVF256,PQ16").type == "ivf-opq"
    assert index_spec("auto", 50_000, 64, factory="IVF256,PQ16").type == "ivf-pq"
