"""Memory for the kernels' runtime weight layouts, backed by 2 MiB pages where the OS gives them.

A batch-1 GEMV streams its weight once per call. With 4 KiB pages every page of the stream
is a TLB miss, and the hardware prefetchers stop at each 4 KiB boundary; on the Sapphire
Rapids VM of bench/RESULTS.md ("CPU kernels at batch 1") one thread summed a 512 MiB array at
11.6-13.5 GB/s on 4 KiB pages and 14.1-15.3 GB/s on 2 MiB pages. So the repacked layouts are
carved out of anonymous mappings advised ``MADV_HUGEPAGE`` (transparent huge pages in
``madvise`` or ``always`` mode), in chunks of at least 64 MiB shared by many weights:

* each chunk is a fresh ``mmap`` (never heap memory already faulted in on 4 KiB pages), its
  2 MiB-aligned part advised before the first touch; untouched tail bytes cost no memory;
* a buffer is a ``torch.uint8`` view of its chunk's mapping, which lives while any view
  does (the allocator holds it weakly: a dropped model's chunks are unmapped);
* where huge pages are unavailable (not Linux, THP ``never``) or ``BITPRESS_HUGEPAGES=0``,
  buffers are plain ``torch.empty``.
"""
from __future__ import annotations

import functools
import mmap
import os
import threading
import weakref

import torch

HUGE = 2 << 20
CHUNK = 64 << 20
ALIGN = 4096  # sub-buffer alignment (the kernels need 64 bytes; a page keeps them apart)


@functools.lru_cache(maxsize=None)  # read once: every repacked weight asks
def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            s = f.read()
    except OSError:
        return "never"
    return s[s.index("[") + 1:s.index("]")] if "[" in s else "never"


def enabled() -> bool:
    """Whether runtime buffers come from huge-page chunks in this process."""
    if os.environ.get("BITPRESS_HUGEPAGES", "1") == "0":
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and _thp_mode() in ("always", "madvise")


class _Chunk:
    """One anonymous mapping; held weakly here (each buffer view holds it strongly), so the
    mapping is unmapped when its last buffer dies."""

    def __init__(self, size: int):
        # private anonymous (a shared one would be shmem, whose huge pages are configured apart)
        m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
        self.start = (-addr) % HUGE  # first 2 MiB-aligned byte
        self.size = size
        try:
            m.madvise(mmap.MADV_HUGEPAGE, self.start, size)
        except OSError:  # a kernel without THP: plain pages, still a valid buffer
            pass
        self.ref = weakref.ref(m)
        self.used = 0
        self.first = m  # the caller's strong reference until its first view exists


_lock = threading.Lock()
_current: list[_Chunk] = []


def empty(nbytes: int) -> torch.Tensor:
    """An uninitialised ``uint8`` tensor of ``nbytes`` for a runtime layout (see module doc)."""
    if nbytes <= 0 or not enabled():
        return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    need = -(-nbytes // ALIGN) * ALIGN
    with _lock:
        ch = _current[0] if _current else None
        m = ch.ref() if ch is not None else None
        if m is None or ch.used + need > ch.size:
            ch = _Chunk(max(CHUNK, -(-need // HUGE) * HUGE))
            m, ch.first = ch.first, None
            _current[:] = [ch]
        off = ch.start + ch.used
        ch.used += need
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=off)


def reset() -> None:
    """Start a new chunk for the next buffer (the current one is unmapped with its last view)."""
    with _lock:
        _current.clear()
