"""/proc/PID/pagemap: one little-endian u64 per virtual page.

Turned into runs of pages worth dumping with numpy: no per-page Python loop,
so scanning 1 GiB (262144 entries) costs a few milliseconds.
"""

from __future__ import annotations

import os
from types import TracebackType

from ._text import proc_path

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61  # file page or shared anon (shmem)
PM_GUARD_REGION = 1 << 58
PM_UFFD_WP = 1 << 57
PM_MMAP_EXCLUSIVE = 1 << 56
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1  # zero unless CAP_SYS_ADMIN
SWP_TYPE_MASK = 0x1F          # a swapped entry: bits 0-4 swap type, 5-54 offset
SWP_PTE_MARKER = 31           # the last swap type: PTE markers (include/linux/swap.h)
ENTRY_SIZE = 8
DEFAULT_CHUNK_PAGES = 1 << 16  # 512 KiB of pagemap per read in PagemapReader

Run = tuple[int, int]  # (start address, number of pages)


def page_runs(
    data: bytes | bytearray | memoryview,
    first_addr: int,
    page_size: int = 4096,
    *,
    anon_only: bool = False,
) -> list[Run]:
    """Runs of consecutive present-or-swapped pages.

    anon_only drops pages with PM_FILE set: in a private file mapping those are
    still the file's own pages, only the COWed (anonymous) ones need dumping.
    """
    if len(data) % ENTRY_SIZE:
        raise ValueError(f"pagemap data length {len(data)} is not a multiple of {ENTRY_SIZE}")
    import numpy as np  # lazily: only the fallback path needs it (~100 ms import)

    entries = np.frombuffer(data, dtype="<u8")
    flags = (entries >> np.uint64(61)).astype(np.uint8)  # bit2 present, bit1 swap, bit0 file
    keep = ((flags & 0b110) != 0) & ~_markers(entries)
    if anon_only:
        keep &= (flags & 0b001) == 0
    return _true_runs(keep, first_addr, page_size)


def _markers(entries):
    """Entries that are PTE markers: a swap entry of the marker type (a
    userfaultfd write-protect mark in an empty slot, a poison or guard
    mark), not a page: nothing to save there."""
    import numpy as np
    swap_only = (entries & np.uint64(PM_PRESENT | PM_SWAP)) == np.uint64(PM_SWAP)
    # the swap type is zeroed for readers without CAP_SYS_ADMIN; a guard
    # region's mark shows to everyone as its own bit
    return swap_only & (((entries & np.uint64(SWP_TYPE_MASK)) == np.uint64(SWP_PTE_MARKER))
                        | ((entries & np.uint64(PM_GUARD_REGION)) != 0))


def _true_runs(keep, first_addr: int, page_size: int) -> list[Run]:
    import numpy as np
    edges = np.diff(keep.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    addrs = starts.astype(np.uint64) * np.uint64(page_size) + np.uint64(first_addr)
    return list(zip(addrs.tolist(), lengths.tolist()))


def marker_runs(data: bytes | bytearray | memoryview, first_addr: int,
                page_size: int = 4096) -> list[Run]:
    """Runs of PTE markers (see _markers) among raw pagemap entries."""
    if len(data) % ENTRY_SIZE:
        raise ValueError(f"pagemap data length {len(data)} is not a multiple of {ENTRY_SIZE}")
    import numpy as np
    return _true_runs(_markers(np.frombuffer(data, dtype="<u8")), first_addr, page_size)


def split_runs(runs: list[Run], max_pages: int, page_size: int = 4096) -> list[Run]:
    """Cut runs into chunks of at most max_pages, to bound I/O buffers."""
    if max_pages < 1:
        raise ValueError("max_pages must be >= 1")
    out: list[Run] = []
    for start, n in runs:
        for done in range(0, n, max_pages):
            out.append((start + done * page_size, min(max_pages, n - done)))
    return out


def _merge_adjacent(runs: list[Run], page_size: int) -> list[Run]:
    """Join runs that touch (they were cut at a read-chunk boundary)."""
    out: list[Run] = []
    for start, n in runs:
        if out and out[-1][0] + out[-1][1] * page_size == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """pread until size bytes or EOF (pagemap stops at the task's address limit)."""
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


class PagemapReader:
    """Holds /proc/PID/pagemap open for many range queries."""

    def __init__(self, pid: int | str, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.scan_ok = True
        self.fd = os.open(proc_path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)

    def read(self, start: int, end: int) -> bytes:
        """Raw entries for pages [start, end); may be short past the user address limit."""
        first, last = start // self.page_size, -(-end // self.page_size)
        return _pread_all(self.fd, (last - first) * ENTRY_SIZE, first * ENTRY_SIZE)

    def runs(
        self, start: int, end: int, anon_only: bool = False, chunk_pages: int = DEFAULT_CHUNK_PAGES
    ) -> list[Run]:
        """Runs of present-or-swapped pages in [start, end).

        Asks the kernel with PAGEMAP_SCAN (ranges, no per-page work); on
        older kernels reads the raw entries in bounded chunks instead."""
        if self.scan_ok:
            try:
                return self._scan(start, end, anon_only)
            except OSError:
                self.scan_ok = False
        runs: list[Run] = []
        step = chunk_pages * self.page_size
        base = start - start % self.page_size
        for lo in range(base, end, step):
            data = self.read(lo, min(lo + step, end))
            runs += page_runs(data, lo, self.page_size, anon_only=anon_only)
        return _merge_adjacent(runs, self.page_size)

    def _scan(self, start: int, end: int, anon_only: bool) -> list[Run]:
        from linuxcr.sys.syscalls import (
            PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, pagemap_scan,
        )
        excl = PAGE_IS_PFNZERO | (PAGE_IS_FILE if anon_only else 0)   # zero page reads as zeros
        ranges = pagemap_scan(self.fd, start, end, anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                              inverted=excl, mask=excl,
                              return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        ps = self.page_size
        # PAGEMAP_SCAN counts PTE markers as swapped (a write tracker puts
        # them in the empty slots of file mappings): look at the swapped-only
        # pages' raw entries and leave the markers out
        swapped = pagemap_scan(self.fd, start, end, anyof=PAGE_IS_SWAPPED,
                               inverted=excl | PAGE_IS_PRESENT, mask=excl | PAGE_IS_PRESENT,
                               return_mask=PAGE_IS_SWAPPED)
        if swapped:
            marks = []
            for s, e in swapped:
                marks += [(a, a + n * ps) for a, n in marker_runs(self.read(s, e), s, ps)]
            if marks:
                from linuxcr.image.runs import normalize, subtract   # pure range arithmetic
                ranges = subtract(ranges, normalize(marks))
        return [(s, (e - s) // ps) for s, e in ranges]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PagemapReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_pagemap(pid: int | str, start: int, end: int, page_size: int = 4096) -> bytes:
    """Raw pagemap entries for [start, end) in one pread."""
    with PagemapReader(pid, page_size) as reader:
        return reader.read(start, end)


def same_frames(parent: bytes | bytearray | memoryview, child: bytes | bytearray | memoryview,
                first_addr: int, page_size: int = 4096) -> list[Run]:
    """Runs of pages that two processes map to the very same physical page
    (raw pagemap entries of one range, read in both): present in both, an
    anonymous page in the child (a private file mapping's page-cache pages
    are the file's, never saved), the same non-zero PFN.  PFNs read as 0
    without CAP_SYS_ADMIN: then nothing is found to be shared."""
    if len(parent) != len(child) or len(child) % ENTRY_SIZE:
        raise ValueError("pagemap data of the two ranges differ in length")
    import numpy as np
    p = np.frombuffer(parent, dtype="<u8")
    c = np.frombuffer(child, dtype="<u8")
    pfn = np.uint64(PM_PFN_MASK)
    keep = ((c & np.uint64(PM_PRESENT | PM_FILE)) == np.uint64(PM_PRESENT)) \
        & ((p & np.uint64(PM_PRESENT)) != 0) & ((c & pfn) != 0) & ((c & pfn) == (p & pfn))
    return _true_runs(keep, first_addr, page_size)
