"""IVF inverted lists served from disk (``index build --on-disk``): galleries bigger than RAM.

An IVF index is a small coarse quantizer (``nlist x D`` floats) plus inverted lists that hold every vector's
code and id: 1,032 bytes per vector for ``IVF,Flat`` at 256-D, 40 for ``PQ32``. For an index built with
``on_disk`` the generation's ``index.faiss`` is written exactly as for any other index, and
:func:`read_mapped` opens it with FAISS's ``IO_FLAG_MMAP``: the quantizer is read into RAM, the lists become
a read-only ``OnDiskInvertedLists`` over a memory map of the file itself. A search pages in the ``nprobe``
lists it visits; the kernel keeps hot lists cached and drops cold ones under memory pressure, so a process
serves an index larger than its RAM (``vectors.npy`` is memory-mapped as well; IVF-PQ reads ``k * rerank``
of its rows per query, IVF-Flat none).

Why this design (rather than a separate ``.ivfdata`` file written by ``OnDiskInvertedLists``):

* the generation folder keeps its five files and stays atomic: nothing names a path, so renaming
  ``.tmp-gen-*`` to ``gen-N`` needs no fix-up, and a reid_ssl without this module reads the same index into
  RAM;
* a published generation is never written: the map is ``PROT_READ`` and ``MAP_SHARED`` of an immutable file,
  so readers in other processes share one page cache.

Changes (what is supported):

* ``add`` / ``remove`` on a mapped index first copy its lists into RAM (:func:`lists_in_ram`: the FAISS
  lists of a mapped index refuse writes, and a write refused inside FAISS's OpenMP loop crashed the process),
  change them there, and :meth:`GalleryIndex.save` writes a new generation and maps it again, so the process
  serves from disk after the save. A change therefore needs the lists in RAM for its duration (like the stored
  vectors, which ``add`` already concatenates in RAM); serving needs neither. A merge of an in-RAM delta into
  the mapped lists at save time would lift that; it is not implemented.
* a save without a change to the lists (a new calibration) hard-links the mapped ``index.faiss`` into the new
  generation (:func:`copy_mapped`; a copy where a link is impossible): no rewrite of a large file.
* the GPU is not used for a mapped index (its copy would need every list in GPU memory).

Prefetching: FAISS's on-disk lists start up to 32 threads per search that read the probed lists ahead of the
search itself; on a warm cache that doubles the memory traffic of a 1-thread search, so
:data:`PREFETCH_THREADS` is 0 (``benchmarks/bench_index_scale.py`` measures both on a cold and a warm cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss

PREFETCH_THREADS = 0  # FAISS's default 32 threads per search cost more than they saved (see the module notes)
_COPY_CHUNK = 1 << 24


@dataclass
class MappedFile:
    """The open ``index.faiss`` whose inverted lists a loaded index maps (it pins the file for :func:`copy_mapped`).

    Attributes:
        path: where it was opened (a later writer may have collected that generation since).
        file: the open file; closed when the index no longer maps it.
    """

    path: Path
    file: BinaryIO

    def close(self) -> None:
        self.file.close()


def has_lists(index: faiss.Index | None) -> bool:
    """Whether ``index`` is an IVF index (possibly under a transform such as OPQ): only those map lists."""
    return index is not None and faiss.try_extract_index_ivf(index) is not None


def mapped_lists(index: faiss.Index | None) -> faiss.OnDiskInvertedLists | None:
    """The on-disk (memory-mapped) inverted lists of ``index``, or None when its lists are in RAM."""
    if index is None or not has_lists(index):
        return None
    invlists = faiss.extract_index_ivf(index).invlists
    assert invlists is not None  # an IVF index always has its lists
    lists = faiss.downcast_InvertedLists(invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_mapped(path: Path) -> tuple[faiss.Index, MappedFile | None]:
    """Read ``index.faiss`` with its inverted lists memory-mapped read-only (None: it has no lists, e.g. the
    exact index a small gallery keeps until it can train; it is then read into RAM as usual).

    FAISS maps only files it opens by name; ``/proc/self/fd/N`` names the file opened here, so a path whose
    bytes are not UTF-8 works and a collected generation raises ``FileNotFoundError`` like the other reads.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: FAISS cannot read it.
    """
    f = open(path, "rb")  # noqa: SIM115 - kept open for the lifetime of the map (MappedFile.close)
    try:
        name = f"/proc/self/fd/{f.fileno()}" if os.path.isdir("/proc/self/fd") else str(path)
        index = faiss.read_index(name, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        lists = mapped_lists(index)
    except BaseException:
        f.close()
        raise
    if lists is None:
        f.close()
        return index, None
    lists.prefetch_nthread = PREFETCH_THREADS
    return index, MappedFile(Path(path), f)


def lists_in_ram(index: faiss.Index) -> None:
    """Replace the mapped inverted lists of ``index`` by a copy in RAM, so that it can be changed.

    The copy takes the lists' size in RAM (``ntotal * (code_size + 8)`` bytes).
    """
    ivf = faiss.extract_index_ivf(index)
    src = ivf.invlists
    assert src is not None  # an IVF index always has its lists
    dst = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        n = src.list_size(i)
        if n:
            dst.add_entries(i, n, src.get_ids(i), src.get_codes(i))
    ivf.replace_invlists(dst, True)  # the index owns the copy and frees the mapped lists (unmaps)
    dst.this.disown()  # type: ignore[attr-defined]  # SWIG's ownership handle, not in faiss's stubs


def copy_mapped(mapped: MappedFile, dst: Path) -> None:
    """Put the mapped ``index.faiss`` unchanged at ``dst``: a hard link when its path still names the mapped
    file (a published generation is never written, so two generations may share it), else a copy, fsynced.
    """
    try:
        if os.path.samestat(os.stat(mapped.path), os.fstat(mapped.file.fileno())):
            os.link(mapped.path, dst)
            return
    except OSError:
        pass  # collected meanwhile, or a file system without hard links: copy from the open file
    fd, offset = mapped.file.fileno(), 0
    with open(dst, "wb") as out:
        while chunk := os.pread(fd, _COPY_CHUNK, offset):
            out.write(chunk)
            offset += len(chunk)
        out.flush()
        os.fsync(out.fileno())
