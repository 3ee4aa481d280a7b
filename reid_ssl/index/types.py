"""Index types: one :data:`INDEX_TYPES` entry owns everything about a FAISS index type.

An :class:`IndexType` says which ``faiss.index_factory`` string and parameters to use for ``n`` vectors of
dimension ``d`` (by the rules of :mod:`reid_ssl.index.sizing`), how many vectors it needs before it can be
trained, which search parameters it takes (IVF ``nprobe``, HNSW ``efSearch``) and how a search that came back
short can be fixed, how many candidates to re-rank exactly from the stored vectors, and whether it can delete
vectors (HNSW cannot: a removal rebuilds). Adding a type is one ``INDEX_TYPES.register`` call; ``index build
--type`` offers every entry plus ``auto``. :mod:`reid_ssl.index.factory` builds the FAISS index of a spec.

Defaults by size (``python -m benchmarks.bench_index_scale``, results/bench_index_scale.json: synthetic re-ID
features, 1M x 256-D, one thread of a shared 2-core AMD EPYC at load average 3-6; recall@10 against exact
search for queries of present / absent identities, single-query p50):

* ``auto`` = ``flat`` while one query scans at most :data:`AUTO_FLAT_FLOATS` floats (n x D; 20,000 x 512-D,
  40,000 x 256-D): exact search costs 0.12-0.3 ns per float on this CPU (1.2-3 ms there; 37 ms at 1M x 256-D,
  where IVF-Flat answers in 2.1 ms at recall 0.997 / 0.990).
* ``ivf-flat`` above, while its lists (4D + 8 bytes per vector: 1,032 B at 256-D, measured) stay within
  :data:`AUTO_IVF_FLAT_FLOATS` (4 GiB: 4.2M vectors at 256-D, 2.1M at 512-D). It is the most accurate per
  millisecond and the quickest to build (93 s at 1M: train 62 s, add 25 s).
* ``ivf-opq`` beyond: OPQ-rotated PQ codes of D/8 bytes (45 B/vector in the index at 256-D, ids included),
  exact re-ranking of 8 x k candidates from the memory-mapped vectors: recall 0.996 / 0.978 at 1.4 ms at 1M,
  where plain ``ivf-pq`` needs 4x the re-ranking reads for the same recall (rerank 8: 0.967 / 0.896, flat
  beyond nprobe 128; rerank 32: 0.996 / 0.984). The rotation costs training time (229 s vs 106 s at 1M).
* ``hnsw`` is never chosen: no deletes (a removal rebuilds), slowest build, 1.3 KB/vector.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from reid_ssl.index.sizing import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    TRAIN_POINTS_PER_LIST,
    default_nprobe,
    ivf_nlist,
    pq_m,
    pq_nbits,
)
from reid_ssl.registry import Registry

if TYPE_CHECKING:  # FAISS is imported where it is used: the command line lists the types without loading it
    import faiss

AUTO = "auto"
AUTO_FLAT_MAX = 20_000  # vectors of 512-D that ``auto`` keeps exact (see AUTO_FLAT_FLOATS)
AUTO_FLAT_FLOATS = AUTO_FLAT_MAX * 512  # exact while n x D <= this: 1.2-3 ms per query on one core
AUTO_IVF_FLAT_FLOATS = 2**30  # ivf-flat while its lists (4 bytes per float) fit in 4 GiB, ivf-opq above


@dataclass(frozen=True)
class IndexSpec:
    """A resolved choice: a FAISS factory string and its search-time parameters (stored in the manifest).

    Attributes:
        type: the :data:`INDEX_TYPES` name.
        factory: ``faiss.index_factory`` description (see :meth:`IndexType.new_index` for the stable ids).
        nprobe: IVF lists visited per query.
        ef_search: HNSW candidate list size.
        rerank: fetch ``k * rerank`` candidates and re-score them exactly from the stored vectors (PQ codes
            are lossy).
        train_size: vectors sampled to train the coarse quantizer / PQ codebooks (0: no training).
    """

    type: str
    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int = 1
    train_size: int = 0


class IndexType:
    """An exact index (``Flat``): no training, no search parameters, deletes in place. Subclass to vary."""

    name = "flat"
    min_train = 0  # fewer vectors than this: keep an exact Flat index until an add reaches it
    can_remove = True  # False: a removal rebuilds the index from the stored vectors
    on_gpu = True  # faiss-gpu can take it
    lists = False  # inverted lists, which an on-disk index serves memory-mapped (reid_ssl.index.ondisk)
    setting: str | None = None  # the search parameter that trades speed for recall

    def spec(self, n: int, dim: int) -> IndexSpec:
        """The factory string and parameters for ``n`` vectors of dimension ``dim``."""
        return IndexSpec(self.name, "Flat")

    def claims(self, factory: str) -> bool:
        """Whether an explicit factory string builds this kind of index (``flat`` takes what no type claims)."""
        return False

    def spec_for_factory(self, factory: str, n: int, dim: int) -> IndexSpec:
        """The spec for an explicit factory string that :meth:`claims` returned True for."""
        return dataclasses.replace(self.spec(n, dim), factory=factory)

    def new_index(self, factory: str, dim: int) -> faiss.Index:
        """An empty inner-product FAISS index that takes stable ids (``add_with_ids``, ``remove_ids``).

        Wrapped in ``IDMap2`` (inverted lists store ids themselves and override this).
        """
        import faiss

        index = cast("faiss.IndexIDMap2", faiss.index_factory(dim, "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT))
        self.configure(faiss.downcast_index(index.index))
        return index

    def configure(self, index: faiss.Index) -> None:
        """Set build-time parameters on a new (unwrapped) FAISS index."""

    def retrain_due(self, trained_on: int, n: int) -> bool:
        """Whether an index trained on ``trained_on`` vectors should be rebuilt now that there are ``n``."""
        return False

    def search_params(
        self, spec: IndexSpec, sel: Any, nprobe: int | None = None, ef_search: int | None = None
    ) -> faiss.SearchParameters | None:
        """FAISS search parameters: the filter ``sel`` and this type's setting (overrides win)."""
        import faiss

        # faiss's stubs miss the keyword __init__ that faiss.class_wrappers gives every SearchParameters class
        return faiss.SearchParameters(sel=sel) if sel is not None else None  # type: ignore[call-arg]

    def shortfall(self, index: faiss.Index, spec: IndexSpec, nprobe: int | None, ef_search: int | None) -> dict | None:
        """Why this type's search found fewer items than pass the filters: ``Shortfall`` fields, or None.

        An exact search never misses, so the base type has no reason of its own.
        """
        return None


class IVFType(IndexType):
    """Inverted lists: ``IVF{nlist}``; visits ``nprobe`` lists per query."""

    setting = "nprobe"
    lists = True

    def nlist(self, n: int) -> int:
        return ivf_nlist(n)

    def claims(self, factory: str) -> bool:
        return "IVF" in factory

    def spec_for_factory(self, factory: str, n: int, dim: int) -> IndexSpec:
        m = re.search(r"IVF(\d+)", factory)
        nlist = int(m.group(1)) if m else self.nlist(n)
        return dataclasses.replace(self.spec(n, dim), factory=factory, nprobe=default_nprobe(nlist))

    def new_index(self, factory: str, dim: int) -> faiss.Index:
        """The bare IVF index: its lists store the ids. (``IDMap2.remove_ids`` renumbers the ids it maps as if
        the index below shifted its rows, which IVF does not: after a removal, searches returned other items.)
        """
        import faiss

        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)

    def retrain_due(self, trained_on: int, n: int) -> bool:
        return n >= 4 * max(trained_on, 1)  # trained on a much smaller gallery: too few lists now

    def search_params(
        self, spec: IndexSpec, sel: Any, nprobe: int | None = None, ef_search: int | None = None
    ) -> faiss.SearchParameters:
        import faiss

        # keyword __init__ from faiss.class_wrappers, missing in faiss's stubs
        return faiss.SearchParametersIVF(nprobe=int(nprobe or spec.nprobe or 1), sel=sel)  # type: ignore[call-arg]

    def shortfall(self, index: faiss.Index, spec: IndexSpec, nprobe: int | None, ef_search: int | None) -> dict | None:
        import faiss

        nlist = int(faiss.extract_index_ivf(index).nlist)
        used = int(nprobe or spec.nprobe or 1)
        if used >= nlist:
            return None
        return {
            "cause": "nprobe",
            "message": f"the search visited {used} of the index's {nlist} inverted lists (nprobe {used}) and found "
            "no more candidates in them; a larger nprobe visits more lists",
            "setting": "nprobe",
            "current": used,
            "maximum": nlist,
        }


class IVFFlatType(IVFType):
    name = "ivf-flat"
    min_train = 156  # 4 lists of 39 points

    def spec(self, n: int, dim: int) -> IndexSpec:
        nlist = self.nlist(n)
        train_size = min(n, TRAIN_POINTS_PER_LIST * nlist)
        return IndexSpec(self.name, f"IVF{nlist},Flat", nprobe=default_nprobe(nlist), train_size=train_size)

    def claims(self, factory: str) -> bool:
        return "IVF" in factory and "PQ" not in factory


class IVFPQType(IVFType):
    name = "ivf-pq"
    min_train = 1000
    rerank = 32  # 8 plateaued at recall@10 0.967 / 0.896 at 1M x 256-D (PQ32); 32 reached 0.996 / 0.984
    prefix = ""

    def spec(self, n: int, dim: int) -> IndexSpec:
        nlist = self.nlist(n)
        nbits = pq_nbits(n)
        m = pq_m(dim)
        return IndexSpec(
            self.name,
            f"{self.prefix.format(m=m)}IVF{nlist},PQ{m}x{nbits}np",
            nprobe=default_nprobe(nlist),
            rerank=self.rerank,
            train_size=min(n, max(TRAIN_POINTS_PER_LIST * nlist, 39 * 2**nbits)),
        )

    def claims(self, factory: str) -> bool:
        return "IVF" in factory and "PQ" in factory and not factory.startswith("OPQ")


class IVFOPQType(IVFPQType):
    """IVF-PQ behind an OPQ rotation (``OPQ{m},IVF{nlist},PQ{m}``): codes that keep more of each vector, so a
    shallower exact re-ranking reaches the same recall (fewer reads of the stored vectors per query)."""

    name = "ivf-opq"
    rerank = 8  # recall@10 0.996 / 0.978 at nprobe 128, 1M x 256-D (32: 0.997 / 0.990)
    prefix = "OPQ{m},"

    def claims(self, factory: str) -> bool:
        return factory.startswith("OPQ") and "IVF" in factory


class HNSWType(IndexType):
    name = "hnsw"
    can_remove = False  # FAISS's HNSW cannot delete: a removal rebuilds from the stored vectors
    on_gpu = False
    setting = "ef_search"

    def spec(self, n: int, dim: int) -> IndexSpec:
        return IndexSpec(self.name, "HNSW32,Flat", ef_search=HNSW_EF_SEARCH)

    def claims(self, factory: str) -> bool:
        return factory.startswith("HNSW")  # "IVF1024_HNSW32,Flat" is an IVF index with an HNSW quantizer

    def configure(self, index: faiss.Index) -> None:
        import faiss

        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION

    def search_params(
        self, spec: IndexSpec, sel: Any, nprobe: int | None = None, ef_search: int | None = None
    ) -> faiss.SearchParameters:
        import faiss

        # SearchParametersHNSW exists (SWIG) but faiss's stubs do not declare it
        return faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=int(ef_search or spec.ef_search or HNSW_EF_SEARCH), sel=sel
        )

    def shortfall(self, index: faiss.Index, spec: IndexSpec, nprobe: int | None, ef_search: int | None) -> dict | None:
        used = int(ef_search or spec.ef_search or HNSW_EF_SEARCH)
        return {
            "cause": "ef_search",
            "message": f"the graph search kept {used} candidates (efSearch {used}) and found no more that pass "
            "the filters; a larger efSearch explores more of the graph",
            "setting": "ef_search",
            "current": used,
            "maximum": None,
        }


INDEX_TYPES: Registry[IndexType] = Registry("index type")
INDEX_TYPES.register("flat", IndexType(), help="exact inner product over every vector (brute force)")
INDEX_TYPES.register("ivf-flat", IVFFlatType(), help="inverted lists of full vectors, nprobe of them visited per query")
INDEX_TYPES.register(
    "ivf-pq", IVFPQType(), help="inverted lists of product-quantized codes (64 B/vector at 512-D), exact re-ranking"
)
INDEX_TYPES.register(
    "ivf-opq",
    IVFOPQType(),
    help="ivf-pq behind an OPQ rotation: better codes, 4x shallower re-ranking, slower training (auto above ~2M)",
)
INDEX_TYPES.register("hnsw", HNSWType(), help="HNSW graph (32 links); cannot delete, so removals rebuild it")


def type_choices() -> list[str]:
    """``auto`` and every registered type: the choices of ``index build --type``."""
    return [AUTO, *INDEX_TYPES.names()]


def resolve_type(index_type: str, n: int, dim: int = 512) -> IndexType:
    """The registered type for a name, ``auto`` resolved by gallery size ``n`` and dimension ``dim``.

    ``auto``: ``flat`` while n x dim <= :data:`AUTO_FLAT_FLOATS`, ``ivf-flat`` while n x dim <=
    :data:`AUTO_IVF_FLAT_FLOATS`, ``ivf-opq`` above (the evidence is in the module notes).

    Raises:
        UnknownNameError: neither ``auto`` nor registered (lists the choices).
    """
    if index_type == AUTO:
        floats = n * dim
        index_type = (
            "flat" if floats <= AUTO_FLAT_FLOATS else "ivf-flat" if floats <= AUTO_IVF_FLAT_FLOATS else "ivf-opq"
        )
    return INDEX_TYPES[index_type]


def type_for_factory(factory: str) -> IndexType:
    """The type whose behaviour (search parameters, removal, re-ranking) fits an explicit factory string."""
    for _, kind in INDEX_TYPES.items():
        if kind.claims(factory):
            return kind
    return INDEX_TYPES["flat"]


def index_spec(
    index_type: str,
    n: int,
    dim: int,
    *,
    factory: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int | None = None,
) -> IndexSpec:
    """The spec for ``n`` vectors of dimension ``dim``.

    Args:
        index_type: a :data:`INDEX_TYPES` name or ``"auto"``.
        factory: an explicit ``faiss.index_factory`` string; the type is then the one that :meth:`claims` it.
        nprobe, ef_search, rerank: overrides of the type's values.

    Raises:
        UnknownNameError: an unknown type (lists the choices).
    """
    if factory:
        resolve_type(index_type, n, dim)  # an unknown name is an error even when a factory is given
        spec = type_for_factory(factory).spec_for_factory(factory, n, dim)
    else:
        spec = resolve_type(index_type, n, dim).spec(n, dim)
    overrides = {"nprobe": nprobe, "ef_search": ef_search, "rerank": rerank}
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v}
    return dataclasses.replace(spec, **changes) if changes else spec


# moved to reid_ssl.index.factory (which imports this module): still importable from here
_MOVED = ("build_faiss", "check_factory", "check_on_disk", "choose_spec", "should_rebuild")


def __getattr__(name: str) -> Any:
    """The names that moved to :mod:`reid_ssl.index.factory`, loaded on first use (:pep:`562`)."""
    if name in _MOVED:
        return getattr(importlib.import_module("reid_ssl.index.factory"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
