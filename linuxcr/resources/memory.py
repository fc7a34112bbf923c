"""Memory: the address space of a process (VMAs, page contents, vDSO), both halves.

Dump: classify every mapping from /proc/PID/smaps, then copy only the pages
that are present or swapped (pagemap), and for private file mappings only
those that were written (anonymous copies): the rest is re-mapped from the
file at restore.  Every copy out of a task goes through one loop
(read_ahead: a ring of buffers, a helper thread one chunk ahead).

Restore (restart, the migration destination, rollback): a trampoline where
the saved layout leaves room (map_trampoline, empty_but_trampoline), every
area mapped at its address (prepare_areas, map_areas), the pages poured in
from the image (PageFill) or from a snapshot child (copy_pages); a live
address space reconciled with a saved layout (plan, reconcile: the
migration's skeleton, a full rollback) and the pages it should not hold
dropped (drop_pages).
"""
from __future__ import annotations

import bisect
import os
import stat
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from linuxcr.pipeline import RING, prefetch
import msgspec

from linuxcr import faults
from linuxcr.errors import ImageError, LcrError, NotCheckpointable, RestoreError
from linuxcr.image.kinds import MAX_CONTENT, MemfdState, UnlinkedState
from linuxcr import faults
from linuxcr.image.schema import FileDesc, PageMap, Pages, RecType, ShmObject, Vma
from linuxcr.image import runs
from linuxcr.image.stream import SMALL_DATA, ImageReader, ImageWriter, Record
from linuxcr.procfs import PagemapReader, SmapsEntry, read_maps, split_runs
from linuxcr.procfs.pagemap import same_frames
from linuxcr.remote.task import Arena, Tracee
from linuxcr.sys.syscalls import PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED
from linuxcr.sys.syscalls import TASK_SIZE, pagemap_scan
from linuxcr.resources.fdkinds import memfd as memfds, unlinked
from linuxcr.resources import sysvipc

PAGE = os.sysconf("SC_PAGE_SIZE")
# Bytes per PAGES record, and the size of each copy buffer: small enough
# that the three buffers stay in the CPU cache between the read from the
# task, the checksum and the write (with 16 MiB buffers each step went
# through main memory: the copy took 1.3-1.7x as long, the restore of such
# records 1.3x; 4, 2 and 1 MiB were alike).  docs/benchmarks.md.
CHUNK = 1 << 20
VDSO_KINDS = ("vvar", "vvar_vclock", "vdso")
# a memfd, or a file unlinked since it was mapped: one object per (dev, inode),
# restored by lcr (fdkinds/memfd.py, unlinked.py) and mapped by its fd
OBJECT_KINDS = ("memfd", "deleted")
MAX_OBJECTS_TOTAL = 3 * MAX_CONTENT  # data of all memfds and unlinked files of a tree
LCR_SHM = "/memfd:lcr-shm"           # shared anonymous memory as open_shm restores it
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x01, 0x02, 0x10, 0x20, 0x100
MADVISE = {"hg": 14, "nh": 15, "dd": 16, "dc": 10, "wf": 18, "mg": 12}   # vmflag -> MADV_*
MADV_DONTNEED = 4
ARCH_MAP_VDSO_64 = 0x2003
TRAMPOLINE = 16 * PAGE          # one page of code, the rest scratch for arguments
MIN_ADDR = 0x1000000
BATCH_AT = 16                   # Tracee.batch's code in the trampoline's code page
CHAIN_BATCH = 4 << 20           # bytes of small pieces gathered per write from a chain


@dataclass(frozen=True)
class Area:
    """One mapping: what the image records, or why it cannot be saved."""
    vma: Vma | None
    reason: str | None = None


def _prot(perms: str) -> int:
    return (PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0) | \
        (PROT_EXEC if perms[2] == "x" else 0)


def classify(e: SmapsEntry) -> Area | None:
    """Turn one smaps entry into a Vma, a refusal, or None (not ours to save)."""
    m = e.map
    where = f"mapping 0x{m.start:x}-0x{m.end:x}"
    base = dict(start=m.start, end=m.end, prot=_prot(m.perms), shared=m.shared,
                vmflags=sorted(e.vmflags))
    if m.path == "[vsyscall]":
        return None
    if m.path in ("[vvar]", "[vvar_vclock]", "[vdso]"):
        return Area(Vma(kind=m.path.strip("[]"), name=m.path, **base))
    if "ht" in e.vmflags:
        return Area(None, f"{where} ({m.path or 'anonymous'}): hugetlbfs memory is not supported yet")
    if e.vmflags & {"io", "pf"}:
        return Area(None, f"{where} of {m.path or 'a device'}: device memory is not saved")
    if m.path.startswith("/SYSV") and m.shared:   # inode: the shmid (0 too); saved by sysvipc.py
        return Area(Vma(kind="sysv", name="", shm=m.inode, offset=m.offset, **base),
                    sysvipc.unsupported(where, m.inode))
    if m.inode == 0:  # anonymous: heap, stack, [anon:...], plain
        return Area(Vma(kind="anon", name=m.path, pages=True, **base))
    if m.path == "/dev/zero" and m.shared:   # MAP_SHARED|MAP_ANONYMOUS shows as this
        return Area(Vma(kind="shmem", name="", pages=True, shm=m.inode, offset=m.offset, **base))
    if m.path == LCR_SHM and m.deleted and m.shared:   # the same, once restored (open_shm)
        return Area(Vma(kind="shmem", name="", pages=True, shm=m.inode, offset=m.offset, **base))
    if m.path == "/[aio]" and m.deleted:     # an io_setup ring: the kernel context is not memory
        return Area(None, f"{where}: a Linux AIO context (io_setup ring) is not saved (its requests "
                          "and completions live in the kernel); io_destroy it before the "
                          "checkpoint (lcr does not make AIO contexts again yet)")
    if m.path == "/secretmem" and m.deleted:
        return Area(None, f"{where}: memfd_secret memory cannot be read")
    dev = os.makedev(m.dev_major, m.dev_minor)
    path = m.path
    if m.deleted and m.path.startswith("/"):
        # a memfd, or a file unlinked since it was mapped: the object -- unless
        # the file is still linked under another name (glibc's sem_open creates
        # /dev/shm/sem.XXXXXX, links it to its final name, unlinks the first):
        # then it is a file, mapped again by that name
        linked = None if m.path.startswith(memfds.PREFIX) else linked_name(m.path, dev, m.inode)
        if linked is None:
            kind = "memfd" if m.path.startswith(memfds.PREFIX) else "deleted"
            return Area(Vma(kind=kind, path=m.path, offset=m.offset, pages=not m.shared,
                            shm=m.inode, dev=dev, **base))
        path = linked
    if path.startswith("/dev/") and not _is_file(path, dev, m.inode):   # /dev/shm holds files
        return Area(None, f"{where} of {path}: device memory is not saved")
    return Area(Vma(kind="file", path=path, offset=m.offset, pages=not m.shared, **base))


def _is_file(path: str, dev: int, ino: int) -> bool:
    """Is path (still) the regular file (dev, ino)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)


LINKED_SCAN_MAX = 4096   # directory entries looked at for another name of an unlinked file


def linked_name(path: str, dev: int, ino: int) -> str | None:
    """Another name, in the same directory, of the regular file (dev, ino)
    that ``path`` named before it was unlinked (None: none found)."""
    d = os.path.dirname(path) or "/"
    try:
        with os.scandir(d) as it:
            for i, e in enumerate(it):
                if i >= LINKED_SCAN_MAX:
                    break
                if e.inode() == ino and _is_file(e.path, dev, ino):
                    return e.path
    except OSError:
        pass
    return None


def check(smaps: list[SmapsEntry]) -> list[str]:
    return [a.reason for a in map(classify, smaps) if a is not None and a.reason]


def collect(smaps: list[SmapsEntry]) -> list[Vma]:
    return [a.vma for a in map(classify, smaps) if a is not None and a.vma is not None]


def page_runs(pid: int, vmas: list[Vma], t: Tracee | None = None) -> list[tuple[int, int]]:
    """(address, pages) of every page worth saving, in chunks of at most CHUNK.
    ``t``: the task, whose shared anonymous areas see_shared looked at."""
    out: list[tuple[int, int]] = []
    for _v, got in _saved_runs(pid, vmas, t):
        out += split_runs(got, CHUNK // PAGE)
    return out


def _saved_runs(pid: int, vmas: list[Vma], t: Tracee | None = None
                ) -> Iterator[tuple[Vma, list[tuple[int, int]]]]:
    """Each area with pages, and (address, pages) of its pages present or
    swapped -- in private file mappings (and memfds, unlinked files) only
    the anonymous copies: the rest is the file's."""
    seen = _SEEN.get(t, {}) if t is not None else {}
    with PagemapReader(pid) as pm:
        for v in vmas:
            if v.pages:
                held = _object_runs(pid, v) if v.kind == "shmem" else None
                if held is None and v.start in seen:      # no root: mincore (see_shared)
                    held = _union(seen[v.start], pm.runs(v.start, v.end, anon_only=False))
                yield v, held if held is not None else \
                    pm.runs(v.start, v.end, anon_only=v.kind == "file" or v.kind in OBJECT_KINDS)


def _object_runs(pid: int, v: Vma) -> list[tuple[int, int]] | None:
    """The pages a shared anonymous object holds under area v: also those no
    page table of this process maps (written by a process that has exited,
    or not faulted in here), which pagemap does not show.  SEEK_DATA on the
    object through /proc/PID/map_files (root); None where that is refused."""
    try:
        fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    out: list[tuple[int, int]] = []
    try:
        pos, end = v.offset, v.offset + v.end - v.start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:        # ENXIO: no data from pos on
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((v.start + data - v.offset, (hole - data) // PAGE))
            pos = hole
    finally:
        os.close(fd)
    return out


# Without root (no map_files) the pages of a shared anonymous object are
# found by mincore() run inside the task (issue 17): it reports the pages
# the object holds in its page cache whether or not this process maps them.
# Taken while the task is frozen (collect_task), used when its pages are
# written (dump_pages, dump_changed): Tracee -> area start -> runs.
_SEEN: "weakref.WeakKeyDictionary[Tracee, dict[int, list[tuple[int, int]]]]" = weakref.WeakKeyDictionary()
_RESIDENT = bytes(i & 1 for i in range(256))     # mincore byte -> 0/1


def resident_runs(start: int, vec: bytes) -> list[tuple[int, int]]:
    """(address, pages) of the pages a mincore vector for the area at
    ``start`` marks resident (bit 0 of each byte)."""
    bits = bytes(vec).translate(_RESIDENT)
    out: list[tuple[int, int]] = []
    i, n = bits.find(1), len(bits)
    while i >= 0:
        j = bits.find(0, i)
        j = n if j < 0 else j
        out.append((start + i * PAGE, j - i))
        i = bits.find(1, j) if j < n else -1
    return out


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(s, (e - s) // PAGE) for s, e in
            runs.normalize([(s, s + k * PAGE) for s, k in a + b])]


def _opens(pid: int, v: Vma) -> bool:
    try:
        os.close(os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def see_shared(t: Tracee, smaps: list[SmapsEntry], vmas: list[Vma]) -> None:
    """For a task whose shared anonymous objects lcr cannot open (no root):
    one injected mincore per such area, its vector in a scratch mapping in
    the task, read back at once; what it finds is what _saved_runs stores.
    A page of such an object that is in swap cannot be seen this way: an
    area with swapped pages is refused rather than saved without them."""
    areas = [v for v in vmas if v.kind == "shmem" and v.pages]
    _SEEN.pop(t, None)
    if not areas or _opens(t.pid, areas[0]):
        return
    swap = {e.map.start: e.fields.get("Swap", 0) for e in smaps}
    bad = [f"shared area 0x{v.start:x}-0x{v.end:x} of pid {t.pid} has pages in swap that lcr "
           "cannot see without root: run as root or swapoff" for v in areas if swap.get(v.start, 0)]
    if bad:
        raise NotCheckpointable(t.pid, bad)
    most = max(v.end - v.start for v in areas) // PAGE
    seen: dict[int, list[tuple[int, int]]] = {}
    with t.scratch(-(-most // PAGE) * PAGE) as addr:
        for v in areas:
            n = (v.end - v.start) // PAGE
            t.syscall("mincore", v.start, v.end - v.start, addr)
            seen[v.start] = resident_runs(v.start, t.read(addr, n))
    _SEEN[t] = seen


_RING: list[memoryview] = []


def _ring(n: int = RING) -> list[memoryview]:
    """The copy buffers, made once per lcr process (at least n): fresh
    memory is costly (zeroing, and on VMs a host fault per page), a tree
    has many tasks."""
    while len(_RING) < n:
        _RING.append(memoryview(bytearray(CHUNK)))
    return _RING[:n]


def dump_pages(tasks: list[tuple[Tracee, list[Vma]]], w: ImageWriter, progress=None,
               shared: dict[int, list[Span]] | None = None) -> int:
    """The pages of every task through one pipeline (not one per task, which
    would drain at every task boundary): a helper thread reads the next
    chunk, of this task or of the next one, while this one checksums and
    writes the previous one out.  ``shared``: pid -> byte ranges of pages
    not to store (a child's pages shared with its parent, cow_shared)."""
    shared = shared or {}
    work = ((t.pid, t, [(addr, n * PAGE)]) for t, vmas in tasks
            for addr, n in _unshared_runs(t.pid, vmas, shared.get(t.pid, []), t))
    total = 0
    # the helper threads also checksum each chunk (xxhash drops the GIL)
    # while it is in their cache: this thread only writes
    for (pid, cs), pieces, view in read_ahead(
            work, post=lambda pid, pieces, view: (pid, w.page_digest(pid, pieces[0][0], view)),
            readers=dump_readers()):
        w.page_run(pid, pieces[0][0], view, cs)
        total += len(view) // PAGE
        if progress:
            progress(len(view))
    return total


def dump_readers() -> int:
    """How many threads read (and checksum) pages for a checkpoint: two
    when a CPU is free for the second (reading and checksumming a chunk
    costs more than writing it to the page cache, so one reader leaves the
    writer waiting), else one.  LCR_DUMP_READERS forces it (1-4)."""
    return _threads("LCR_DUMP_READERS")


def _threads(env: str) -> int:
    forced = os.environ.get(env, "")
    if forced.isdigit() and int(forced) > 0:
        return min(int(forced), 4)
    try:
        cpus = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except OSError:
        return 1
    return 2 if cpus >= 3 or (cpus >= 2 and load < cpus - 1) else 1


def _unshared_runs(pid: int, vmas: list[Vma], shared: list[Span], t: Tracee | None = None
                   ) -> list[tuple[int, int]]:
    """page_runs without the ``shared`` byte ranges."""
    got = page_runs(pid, vmas, t)
    if not shared:
        return got
    keep = runs.subtract(runs.normalize((a, a + n * PAGE) for a, n in got), runs.normalize(shared))
    return split_runs([(s, (e - s) // PAGE) for s, e in keep], CHUNK // PAGE)


# --- pages a child shares with its parent (copy-on-write since a fork) ------------

INHERITABLE = ("anon", "file")


def inheritable(v: Vma) -> bool:
    """An area fork() gives a child as a copy-on-write copy of its pages."""
    return v.kind in INHERITABLE and v.pages and not not_cow(v)


def cow_key(v: Vma) -> tuple:
    """What a child's area and its parent's must agree in for the child to
    inherit the parent's restored area as it is (mapping, protection,
    name, madvise flags)."""
    return (v.start, v.end, v.kind, v.path, v.offset, v.prot, v.name,
            tuple(sorted(f for f in v.vmflags if f in MADVISE or f == "gd")))


def cow_shared(parent: int, pvmas: list[Vma], child: int, cvmas: list[Vma]) -> list[Span]:
    """Byte ranges of the child's pages that are its parent's very pages
    (same PFN, in an area the child inherits as it is, cow_key): found in
    /proc/PID/pagemap of both, no page read.  Without CAP_SYS_ADMIN the
    PFNs read as 0 and nothing is shared (every page is stored)."""
    theirs = {cow_key(v) for v in pvmas if inheritable(v)}
    out: list[Span] = []
    with PagemapReader(parent) as pp, PagemapReader(child) as cp:
        for v in cvmas:
            if not inheritable(v) or cow_key(v) not in theirs:
                continue
            mine: list[Span] = []
            for lo in range(v.start, v.end, CHUNK * 64):      # 128 KiB of pagemap a read
                hi = min(lo + CHUNK * 64, v.end)
                a, b = pp.read(lo, hi), cp.read(lo, hi)
                if len(a) != len(b):
                    break
                mine += [(s, s + n * PAGE) for s, n in same_frames(a, b, lo, PAGE)]
            out += runs.normalize(mine)   # per area: a run never spans two (inherited_areas)
    return out


def inherited_areas(vmas: list[Vma], pvmas: list[Vma], cow: list[Span], where: str) -> list[Span]:
    """The child's areas (``vmas``) holding its shared pages ``cow``: each
    must be an area the parent (``pvmas``) has the same (cow_key)."""
    theirs = {cow_key(v) for v in pvmas if inheritable(v)}
    starts = [v.start for v in vmas]
    out: list[Span] = []
    for s, e in cow:
        i = bisect.bisect_right(starts, s) - 1
        v = vmas[i] if i >= 0 else None
        if v is None or not (v.start <= s and e <= v.end) or not inheritable(v) \
                or cow_key(v) not in theirs:
            raise ImageError(f"{where} is corrupt: pages at 0x{s:x} marked shared with the parent "
                             "lie outside an area the parent has the same")
        if not out or out[-1] != (v.start, v.end):
            out.append((v.start, v.end))
    return out


def empty_but_inherited(t: Tracee, vmas: list[Vma], keep: list[Span], at: int
                        ) -> tuple[int, Arena]:
    """A child just forked from its restored parent: everything unmapped but
    the areas it inherits (``keep``) and a trampoline: the parent's at
    ``at`` if the child's saved layout ``vmas`` leaves it free, else a new one."""
    if not free_in(vmas, at):
        at = free_gap(vmas, t.pid)
        map_trampoline(t, at)
    t.insn = at
    t.batch_at = at + BATCH_AT       # inherited from the parent: its code page too
    t.batch([("munmap", (s, e - s), True) for s, e in
             runs.subtract([(0, TASK_SIZE)], runs.normalize(keep + [(at, at + TRAMPOLINE)]))])
    return at, Arena(t, at + PAGE, TRAMPOLINE - PAGE)


def drop_unshared(t: Tracee, keep: list[Span], cow: list[Span], stored: list[Span]) -> None:
    """In the inherited areas, the parent's pages the child had not: those
    neither shared (``cow``) nor written with its own pages (``stored``)
    go back to zeros or to the file's content."""
    drop_pages(t, runs.subtract(runs.subtract(runs.normalize(keep), runs.normalize(cow)),
                                runs.normalize(stored)))


class TaskPages:
    """The PAGES records of an image poured task by task, in the order of
    its TASK records (the order checkpoint writes them), so that a parent's
    memory is complete before its children are forked from it.  Each task's
    records go through PageFill.pour, which reads up to a TRAILER: it is
    given the reader through _Upto, which ends where the task's pages end."""

    def __init__(self, reader: ImageReader, first: Record) -> None:
        self.reader, self.pending = reader, first
        self.stored: dict[int, list[Span]] = {}

    def pour(self, pid: int, t: Tracee, vmas: list[Vma]) -> int:
        rec = self.pending
        if rec.type is not RecType.PAGES or rec.meta.pid != pid:  # type: ignore[attr-defined]
            return 0
        upto = _Upto(self.reader, pid)
        fill = PageFill({pid: (t, vmas)}, self.reader.name)
        n = fill.pour(upto, rec)       # type: ignore[arg-type]
        assert upto.pending is not None
        self.pending = upto.pending
        self.stored[pid] = runs.normalize(fill.stored.get(pid, []))
        return n

    def end(self) -> None:
        """After the last task: the trailer must come now."""
        rec = self.pending
        if rec.type is RecType.TRAILER:
            self.reader.expect_end()
            return
        if rec.type is RecType.PAGES:
            raise ImageError(f"{self.reader.name} is corrupt: pages of pid {rec.meta.pid} "  # type: ignore[attr-defined]
                             "out of the order of its tasks (or of no task)")
        raise ImageError(f"{self.reader.name} is corrupt: unexpected {rec.type.name} record "
                         "among pages")


class _Upto:
    """An ImageReader that ends (a TRAILER of its own) before the first
    record that is not a PAGES record of ``pid``; that one is kept (pending)."""

    def __init__(self, reader: ImageReader, pid: int) -> None:
        self.reader, self.pid, self.name = reader, pid, reader.name
        self.pending: Record | None = None

    def next(self) -> Record:
        rec = self.reader.next()
        if rec.type is RecType.PAGES and rec.meta.pid == self.pid:  # type: ignore[attr-defined]
            return rec
        self.pending = rec
        return Record(type=RecType.TRAILER, meta=None, data=memoryview(b""))  # type: ignore[arg-type]

    def widen(self, n: int) -> None:
        self.reader.widen(n)

    def expect_end(self) -> None:
        pass


# --- the one copy loop -----------------------------------------------------------

Piece = tuple[int, int]      # (address, bytes)
Span = tuple[int, int]       # (start, end)


def read_ahead(work: Iterable[tuple[Any, Tracee, list[Piece]]], *, skip_unreadable: bool = False,
               post: Callable[[Any, list[Piece], memoryview], Any] | None = None,
               readers: int = 1) -> Iterator[tuple[Any, list[Piece], memoryview | None]]:
    """Every copy of pages out of a task goes through here: for each item
    (tag, task, pieces), the pieces (at most CHUNK bytes in all) read back
    to back into the next buffer of the ring, by a helper thread one item
    ahead of the caller; yields (tag, pieces, view).  The view is valid
    until the caller asks for the next item (RING buffers: one queued, one
    filling, one in use).  ``skip_unreadable``: a piece that
    cannot be read (unmapped meanwhile) yields None instead of failing.
    ``post(tag, pieces, view)``, run by the helper thread on each item read,
    gives the tag yielded (work done while the buffer is in its cache).
    ``readers`` > 1: that many threads read (and post) items at once,
    yielded in order (process_vm_readv and xxhash drop the GIL)."""
    if readers > 1:
        return _read_parallel(work, skip_unreadable, post, readers)
    ring = _ring()

    def chunks():
        for i, (tag, t, pieces) in enumerate(work):
            yield _read_item(ring[i % RING], tag, t, pieces, skip_unreadable, post)

    return prefetch(chunks())


def _read_item(buf: memoryview, tag: Any, t: Tracee, pieces: list[Piece], skip_unreadable: bool,
               post: Callable[[Any, list[Piece], memoryview], Any] | None
               ) -> tuple[Any, list[Piece], memoryview | None]:
    view: memoryview | None = buf[: sum(n for _, n in pieces)]
    try:
        if len(pieces) == 1:
            t.readinto(pieces[0][0], view)
        else:
            t.readinto_many(pieces, view)
    except (OSError, LcrError):
        if not skip_unreadable:
            raise
        view = None
    if post is not None and view is not None:
        tag = post(tag, pieces, view)
    return tag, pieces, view


def _read_parallel(work: Iterable[tuple[Any, Tracee, list[Piece]]], skip_unreadable: bool,
                   post: Callable[[Any, list[Piece], memoryview], Any] | None, readers: int
                   ) -> Iterator[tuple[Any, list[Piece], memoryview | None]]:
    """read_ahead with ``readers`` threads: item i goes to buffer i % n of
    a ring of n = readers + 2, submitted once the caller has asked for item
    i - readers: the buffers of the item the caller holds and of the one
    before are never being read into."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    n = readers + 2
    ring = _ring(n)
    items = enumerate(work)
    pool = ThreadPoolExecutor(readers, thread_name_prefix="lcr-read")
    pending: deque = deque()

    def submit() -> bool:
        nxt = next(items, None)
        if nxt is None:
            return False
        i, (tag, t, pieces) = nxt
        pending.append(pool.submit(_read_item, ring[i % n], tag, t, pieces, skip_unreadable, post))
        return True

    try:
        while len(pending) < readers and submit():
            pass
        while pending:
            got = pending.popleft().result()
            submit()
            yield got
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)     # no thread writes a buffer once we return


def runs_work(t: Tracee, ranges: Iterable[Span], tag: Any = None):
    """read_ahead work: ranges cut into pieces of at most CHUNK bytes, one per item."""
    return ((tag, t, [(s, e - s)]) for s, e in runs.split(ranges, CHUNK))


def copy_pages(src: Tracee, dst: Tracee, spans: list[Span]) -> int:
    """Pages from one task into the same addresses of another (a snapshot
    child into the live process): gathered, one process_vm_writev per
    batch, the next batch read meanwhile.  Bytes copied."""
    n = 0
    for _tag, pieces, view in read_ahead((None, src, [(s, e - s) for s, e in batch])
                                         for batch in _batches(spans)):
        assert view is not None
        dst.write_scatter(pieces, view)
        n += len(view)
    return n


# --- incremental dump ----------------------------------------------------------

@dataclass
class Changed:
    """What an incremental dump of one task wrote."""
    stored: int                      # pages written as PAGES
    inherited: int                   # pages left to the parents
    runs: list[tuple[int, int, int]]   # the task's page map: (start, end, depth)


def _present(pid: int, vmas: list[Vma], t: Tracee | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Byte ranges of the pages worth saving: (of private areas, of shared ones).
    Shared pages are always stored in full: another process may have written
    them, which no per-process tracker sees."""
    private: list[tuple[int, int]] = []
    shared: list[tuple[int, int]] = []
    for v, got in _saved_runs(pid, vmas, t):
        (shared if v.shared else private).extend((a, a + n * PAGE) for a, n in got)
    return runs.normalize(private), runs.normalize(shared)


def dump_changed(t: Tracee, vmas: list[Vma], w: ImageWriter, held: list[tuple[int, int, int]],
                 written=None, hashes=None, progress=None) -> Changed:
    """The pages of one task that differ from what the parent images hold.

    ``held``: (start, end, depth) of the pages the parents hold.  With a
    write tracker's ``written`` (resources/dirty.py Dirty), a held page is
    inherited unless it was written or lies in an untracked area; without
    one, ``hashes`` (addresses, xxh3 of the parent's pages) decide: a page is
    inherited if its content hashes the same."""
    private, shared = _present(t.pid, vmas, t)
    if written is not None:
        dirty = runs.normalize([(a, a + n * PAGE) for a, n in written.written] + list(written.untracked))
        keep = runs.intersect_tagged(runs.subtract(private, dirty), held)
        store = runs.subtract(runs.normalize(private + shared), runs.normalize((s, e) for s, e, _ in keep))
        stored = _write_ranges(t, store, w, progress)
        return Changed(stored, runs.total(keep) // PAGE,
                       runs.merge_tagged([(s, e, 0) for s, e in store] + keep))
    return _dump_by_content(t, private, shared, w, held, hashes, progress)


def _batches(ranges: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Ranges grouped so that each group is one process_vm_readv: at most
    CHUNK bytes and IOV_MAX pieces (scattered written pages come in
    thousands of small ranges; a thread hand-off or a syscall each costs
    more than the copy)."""
    out: list[list[tuple[int, int]]] = []
    size = 0
    for s, e in runs.split(ranges, CHUNK):
        if not out or size + (e - s) > CHUNK or len(out[-1]) >= 1024:
            out.append([])
            size = 0
        out[-1].append((s, e))
        size += e - s
    return out


def _write_ranges(t: Tracee, ranges: list[tuple[int, int]], w: ImageWriter, progress) -> int:
    """One PAGES record per range, read a batch of ranges at a time."""
    n = 0
    work = ((None, t, [(s, e - s) for s, e in batch]) for batch in _batches(ranges))
    for _tag, pieces, view in read_ahead(work):
        off = 0
        for s, size in pieces:
            w.page_run(t.pid, s, view[off:off + size])
            off += size
        n += len(view) // PAGE
        if progress:
            progress(len(view))
    return n


def _dump_by_content(t: Tracee, private, shared, w: ImageWriter, held, hashes, progress) -> Changed:
    import numpy as np
    import xxhash

    h = xxhash.xxh3_64_intdigest
    paddr, phash = hashes if hashes is not None else (np.empty(0, np.uint64), np.empty(0, np.uint64))
    out: list[tuple[int, int, int]] = []
    stored = inherited = 0
    for _tag, pieces, view in read_ahead(runs_work(t, private)):
        s = pieces[0][0]
        n = len(view) // PAGE
        addrs = np.arange(s, s + n * PAGE, PAGE, dtype=np.uint64)
        same = np.zeros(n, dtype=bool)
        if len(paddr):
            mine = np.fromiter((h(view[i:i + PAGE]) for i in range(0, len(view), PAGE)),
                               dtype=np.uint64, count=n)
            idx = np.minimum(np.searchsorted(paddr, addrs), len(paddr) - 1)
            same = (paddr[idx] == addrs) & (phash[idx] == mine)
        # runs of equal "same" values
        edges = np.flatnonzero(np.diff(same.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), n]
        for a, b in zip(bounds, bounds[1:]):
            lo, hi = s + a * PAGE, s + b * PAGE
            if same[a]:
                for x, y, d in runs.intersect_tagged([(lo, hi)], held):
                    out.append((x, y, d))
                inherited += b - a
            else:
                w.page_run(t.pid, lo, view[a * PAGE: b * PAGE])
                out.append((lo, hi, 0))
                stored += b - a
        if progress:
            progress(len(view))
    stored += _write_ranges(t, shared, w, progress)
    out += [(s, e, 0) for s, e in shared]
    return Changed(stored, inherited, runs.merge_tagged(out))


# --- restore ---------------------------------------------------------------

def vdso_area(vmas: list[Vma]) -> tuple[int, int] | None:
    """(start, end) of the whole vvar+vdso block, as laid out in the image."""
    parts = [v for v in vmas if v.kind in VDSO_KINDS]
    if not parts:
        return None
    return min(v.start for v in parts), max(v.end for v in parts)


def vdso_text(vmas: list[Vma]) -> tuple[int, int] | None:
    """The [vdso] code pages (the vvar pages around it cannot be read)."""
    return next(((v.start, v.end) for v in vmas if v.kind == "vdso"), None)


def shm_objects(all_vmas: list[list[Vma]]) -> tuple[list[ShmObject], list[list[Vma]]]:
    """Shared anonymous objects of a tree; each one's pages are saved once,
    with the first area that maps it."""
    size: dict[int, int] = {}
    out = []
    for vmas in all_vmas:
        fixed = []
        for v in vmas:
            if v.kind == "shmem":
                first = v.shm not in size
                size[v.shm] = max(size.get(v.shm, 0), v.offset + v.end - v.start)
                if not first:
                    v = msgspec.structs.replace(v, pages=False)
            fixed.append(v)
        out.append(fixed)
    return [ShmObject(id=k, size=n) for k, n in size.items()], out


def open_shm(objs: list[ShmObject], mapped: list[MemfdState | UnlinkedState] = ()) -> dict:
    """One memfd per shared object, made by lcr before the tasks (they inherit it).
    It shows as /memfd:lcr-shm in their maps where it showed /dev/zero.
    Then the memfds and unlinked files only mapped; last, every such object
    (also those the fd kinds made in files.open_all) is finished (mode,
    seals) and its fd joins the others, keyed (dev, inode) as saved."""
    fds: dict = {}
    try:
        for o in objs:
            fd = os.memfd_create(LCR_SHM[7:], os.MFD_CLOEXEC)
            fds[o.id] = fd
            os.ftruncate(fd, o.size)
        for st in mapped:
            (memfds.make if isinstance(st, MemfdState) else unlinked.make)(st)
        fds.update(unlinked.OBJECTS.finish())
    except BaseException as e:
        for fd in fds.values():
            os.close(fd)
        unlinked.OBJECTS.forget()
        if isinstance(e, (OSError, OverflowError)):
            raise RestoreError(f"cannot create a shared memory object of the image: {e}") from None
        raise
    return fds


def forget_objects() -> None:
    """Before a restart: drop objects a failed restart may have left (see open_shm)."""
    unlinked.OBJECTS.forget()


# --- dump: memfds and unlinked files that are mapped ---------------------------

def mapped_objects(root: int, tasks: list[tuple[int, list[Vma]]], descs: list[FileDesc]
                   ) -> list[MemfdState | UnlinkedState]:
    """The memfds and unlinked files mapped by the tree but held by none of its
    fds (those are saved with their fd), read through /proc/PID/map_files."""
    seals: dict[tuple[int, int], int] = {}
    total = 0
    for d in descs:
        if isinstance(d.state, (MemfdState, UnlinkedState)):
            c = d.state.content
            seals[(c.dev, c.ino)] = getattr(d.state, "seals", 0)
            total += sum(len(e.data) for e in c.extents)
    held_shm = {d.state.content.ino for d in descs
                if isinstance(d.state, MemfdState) and d.state.name == LCR_SHM[7:]}
    out: dict[tuple[int, int], MemfdState | UnlinkedState] = {}
    reasons = []
    for pid, vmas in tasks:
        for v in vmas:
            if v.kind == "shmem" and v.shm in held_shm:
                reasons.append(f"mapping 0x{v.start:x}-0x{v.end:x}: a memfd named lcr-shm, held by "
                               "an fd, is mapped as shared memory: not supported")
            if v.kind not in OBJECT_KINDS:
                continue
            key = (v.dev, v.shm)
            where = f"mapping 0x{v.start:x}-0x{v.end:x} of {v.path}"
            if key not in seals:
                got = _read_mapped(pid, v, where)
                if isinstance(got, str):
                    reasons.append(got if pid == root else f"child pid {pid}: {got}")
                    seals[key] = 0
                    continue
                out[key] = got
                seals[key] = getattr(got, "seals", 0)
                total += sum(len(e.data) for e in got.content.extents)
            if v.shared and v.prot & PROT_WRITE and seals[key] & memfds.WRITE_SEALS:
                reasons.append(f"{where}: a writable shared mapping of a memfd sealed against "
                               "writes (F_SEAL_FUTURE_WRITE) cannot be made again")
    if total > MAX_OBJECTS_TOTAL:
        reasons.append(f"the memfds and unlinked files of the tree hold {total} bytes of data, "
                       f"more than the {MAX_OBJECTS_TOTAL >> 20} MiB lcr saves in all")
    if reasons:
        raise NotCheckpointable(root, reasons)
    return list(out.values())


def _read_mapped(pid: int, v: Vma, where: str) -> MemfdState | UnlinkedState | str:
    try:
        fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return (f"{where}: cannot read it through /proc/{pid}/map_files ({e.strerror}): "
                "that needs root, or an fd of the tree holding it")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{where}: not a regular file"
        what = f"{where} ({'memfd' if v.kind == 'memfd' else 'unlinked file'})"
        why = unlinked.too_big(what, unlinked.data_runs(fd, st.st_size), st.st_size)
        if why:
            return why
        c = unlinked.read_content(fd, st, key=(v.dev, v.shm))
        if v.kind == "memfd":
            return MemfdState(name=memfds.name_of(v.path), content=c, seals=memfds.seals_of(fd))
        return UnlinkedState(path=v.path, content=c)
    finally:
        os.close(fd)


def map_areas(t: Tracee, vmas: list[Vma], scratch, shm: dict[int, int]) -> None:
    """mmap every saved area at its address in the new task (pages come later).
    The files are opened first; the mmaps and madvises, independent of each
    other, then go in batches (Tracee.batch: one resume for many calls in a
    blank, call by call in a live task)."""
    fds: dict[tuple[str, bool], int] = {}
    calls: list[tuple[str, tuple[int, ...], bool]] = []
    attached: list[tuple[int, int]] = []     # System V segments, attached at once (shmat)
    try:
        for v in vmas:
            if v.kind in VDSO_KINDS:
                continue
            if v.kind == "sysv":
                sysvipc.attach(t, v, attached)
                continue
            prot = v.prot | (PROT_WRITE if v.pages else 0)
            flags = MAP_FIXED | (MAP_SHARED if v.shared else MAP_PRIVATE)
            fd, off = -1, 0
            if v.kind == "anon":
                flags |= MAP_ANONYMOUS | (MAP_GROWSDOWN if "gd" in v.vmflags else 0)
            elif v.kind == "shmem":
                flags, fd, off = MAP_FIXED | MAP_SHARED, shm[v.shm], v.offset
            elif v.kind in OBJECT_KINDS:
                if (v.dev, v.shm) not in shm:
                    raise ImageError(f"image holds a mapping at 0x{v.start:x} of {v.path} "
                                     "whose content was not saved")
                fd, off = shm[(v.dev, v.shm)], v.offset
            else:
                rw = v.shared and "mw" in v.vmflags
                key = (v.path, rw)
                if key not in fds:
                    fds[key] = scratch.open(v.path, os.O_RDWR if rw else os.O_RDONLY,
                                            what=f"file mapped at 0x{v.start:x}")
                fd, off = fds[key], v.offset
            calls.append(("mmap", (v.start, v.end - v.start, prot, flags, fd, off), True))
            for flag, advice in MADVISE.items():
                if flag in v.vmflags:
                    calls.append(("madvise", (v.start, v.end - v.start, advice), False))
        t.batch(calls)
        if attached:
            sysvipc.trim(t, vmas)        # after every mmap: parts the process replaced
    finally:
        for fd in fds.values():
            t.syscall("close", fd, check=False)


def protect_areas(t: Tracee, vmas: list[Vma]) -> None:
    """Drop the write permission we added to fill pages in."""
    t.batch([("mprotect", (v.start, v.end - v.start, v.prot), True) for v in vmas
             if v.pages and not v.prot & PROT_WRITE and v.kind not in VDSO_KINDS])


def check_pages_fit(vmas: list[Vma], addr: int, npages: int) -> bool:
    """Do saved areas with pages cover [addr, addr + npages pages) without a
    gap?  (An incremental image's runs may span adjacent areas.)  ``vmas``
    are sorted and disjoint (restore.validate_task)."""
    end = addr + npages * PAGE
    i = bisect.bisect_right([v.start for v in vmas], addr) - 1
    cur = addr
    while 0 <= i < len(vmas) and cur < end:
        v = vmas[i]
        if not v.pages or not v.start <= cur < v.end:
            return False
        cur = v.end
        i += 1
    return cur >= end


def put_pages(t: Tracee, vmas: list[Vma], addr: int, npages: int, data) -> bool:
    """Write one run of pages into a task being rebuilt, if saved areas with
    pages hold it (False, nothing written, if not)."""
    if not check_pages_fit(vmas, addr, npages):
        return False
    t.write(addr, data)
    return True


# --- the trampoline: where injected syscalls run in a task being rebuilt --------

def free_in(vmas: list[Vma], at: int) -> bool:
    """[at, at + TRAMPOLINE) is free in the saved layout ``vmas``."""
    return MIN_ADDR <= at and at + TRAMPOLINE <= TASK_SIZE and \
        not any(v.start < at + TRAMPOLINE and at < v.end for v in vmas)


def free_gap(vmas: list[Vma], pid: int) -> int:
    """An address free both in the saved layout and in the live task ``pid``."""
    busy = sorted([(v.start, v.end) for v in vmas] + [(m.start, m.end) for m in read_maps(pid)])
    addr = MIN_ADDR
    for start, end in busy:
        if addr + TRAMPOLINE <= start:
            break
        addr = max(addr, (end + PAGE - 1) & ~(PAGE - 1))
    if addr + TRAMPOLINE > TASK_SIZE:
        raise RestoreError("no free address for the restore trampoline")
    return addr


def map_trampoline(t: Tracee, at: int, *, code: bool = True) -> Arena:
    """The trampoline at ``at`` (MAP_FIXED_NOREPLACE): with ``code``, RWX, its
    first page holding the `syscall` instruction the task runs for us and
    the rest scratch for arguments; without, all of it scratch (RW).
    Returns the scratch."""
    t.syscall("mmap", at, TRAMPOLINE, 7 if code else 3, 0x22 | 0x100000, (1 << 64) - 1, 0)
    if not code:
        return Arena(t, at, TRAMPOLINE)
    t.write(at, b"\x0f\x05")
    t.batch_at = at + BATCH_AT       # the rest of the code page: Tracee.batch's
    return Arena(t, at + PAGE, TRAMPOLINE - PAGE)


def move_trampoline(t: Tracee, old: int, vmas: list[Vma]) -> tuple[int, Arena]:
    """A new trampoline where the layout ``vmas`` leaves room; the old one goes."""
    at = free_gap(vmas, t.pid)
    arena = map_trampoline(t, at)
    t.insn = at
    t.syscall("munmap", old, TRAMPOLINE)
    return at, arena


def empty_but_trampoline(t: Tracee, vmas: list[Vma], at: int = 0) -> tuple[int, Arena]:
    """Empty a blank's address space but for a trampoline at an address the
    saved layout ``vmas`` leaves free: the one at ``at`` (inherited from its
    parent) if that is free, else a new one.  (trampoline, scratch)."""
    if not (at and free_in(vmas, at)):
        at = free_gap(vmas, t.pid)
        map_trampoline(t, at)
    t.insn = at
    t.batch_at = at + BATCH_AT       # inherited from the parent: its code page too
    t.batch([("munmap", (0, at), True),      # all but the trampoline: one resume
             ("munmap", (at + TRAMPOLINE, TASK_SIZE - at - TRAMPOLINE), True)])
    return at, Arena(t, at + PAGE, TRAMPOLINE - PAGE)


def prepare_areas(t: Tracee, vmas: list[Vma], scratch: Arena, shm: dict) -> None:
    """In an emptied blank: the vDSO moved to its saved address, every saved
    area mapped (pages come later)."""
    vdso = vdso_area(vmas)
    if vdso:
        t.syscall("arch_prctl", ARCH_MAP_VDSO_64, vdso[0])
    map_areas(t, vmas, scratch, shm)


# --- fill: pages from an image into tasks being rebuilt ---------------------------

def _records(reader: ImageReader, first: Record) -> Iterator[Record]:
    rec = first
    while True:
        yield rec
        if rec.type is RecType.TRAILER:
            return
        rec = reader.next()


def _grouped(reader: ImageReader, first: Record) -> Iterator[list[Record]]:
    """Records in groups: a run of small PAGES records (each has a buffer of
    its own, stream.SMALL_DATA) together, anything else alone.  Scattered
    pages of an incremental image come in thousands of small records."""
    group: list[Record] = []
    size = 0
    for rec in _records(reader, first):
        small = rec.type is RecType.PAGES and len(rec.data) <= SMALL_DATA \
            and rec.data_len <= SMALL_DATA
        if group and (not small or size >= CHAIN_BATCH or len(group) >= 512):
            yield group
            group, size = [], 0
        if small:
            group.append(rec)
            size += len(rec.data)
        else:
            yield [rec]
    if group:
        yield group


def writers() -> int:
    """How many threads write pages into the tasks being restored: two when
    a CPU is free for the second (the reader thread and the first writer
    keep about two busy), else one.  LCR_RESTORE_WRITERS forces it (1-4)."""
    return _threads("LCR_RESTORE_WRITERS")


class _Writers:
    """Large page records written by ``n`` threads, at most ``n`` at once
    (the image reader's rotation holds n + RING + 1 buffers: a record's
    data stays valid until its write is waited for).  Two writes to
    overlapping pages never run at once (the later one waits: last wins,
    as when written in order).  Fault point restore.pages fires on this
    thread, once per record, when its write is known done.  n == 1: no
    thread, written here."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pending: list[tuple[int, int, int, Any]] = []   # pid, start, end, future
        self.pool = None
        if n > 1:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(n, thread_name_prefix="lcr-write")

    def write(self, t: Tracee, addr: int, data: memoryview) -> None:
        if self.pool is None:
            t.write(addr, data)
            faults.point("restore.pages")
            return
        end = addr + len(data)
        while self.pending and (len(self.pending) >= self.n or any(
                p == t.pid and s < end and addr < e for p, s, e, _f in self.pending)):
            self._wait_oldest()
        self.pending.append((t.pid, addr, end, self.pool.submit(t.write, addr, data)))

    def _wait_oldest(self) -> None:
        fut = self.pending.pop(0)[3]
        fut.result()
        faults.point("restore.pages")

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def close(self) -> None:
        """Every write ended (done or failed), the threads gone: the buffers
        are free again.  Errors here are the caller's already."""
        if self.pool is not None:
            for *_x, fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


@dataclass
class PageFill:
    """The pages of an image poured into the tasks being rebuilt, for
    restart and for the migration destination alike.

    ``targets``: pid -> (task, its saved areas: pages must lie inside them).
    Afterwards ``stored`` says which pages the image held, ``maps`` the page
    maps of an incremental image (the pages its parents hold)."""
    targets: dict[int, tuple[Tracee, list[Vma]]]
    name: str
    stored: dict[int, list[Span]] = field(default_factory=dict)
    maps: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    _out: "_Writers | None" = field(default=None, repr=False)

    def _outside(self, addr: int) -> ImageError:
        return ImageError(f"{self.name} is corrupt: pages at 0x{addr:x} lie outside "
                          "every saved memory area")

    def pour(self, reader: ImageReader, first: Record) -> int:
        """Every record from ``first`` to the trailer (the end checked): pages
        written as they come, a helper thread reading (and checking) the
        next records meanwhile, and with ``writers()`` > 1 that many threads
        writing large records at once (process_vm_writev drops the GIL; the
        reader's rotation widened so a record's buffer outlives its write).
        Pages written."""
        n = writers()
        if n > 1:
            reader.widen(n + RING + 1)
        self._out = _Writers(n)
        try:
            total = self._pour(reader, first)
            self._out.drain()
            return total
        finally:
            self._out.close()
            self._out = None

    def _pour(self, reader: ImageReader, first: Record) -> int:
        total = 0
        for group in prefetch(_grouped(reader, first)):
            rec = group[0]
            if len(group) > 1 or (rec.type is RecType.PAGES and len(rec.data) <= SMALL_DATA):
                self._out.drain()
                total += self._small(group)
            elif rec.type is RecType.TRAILER:
                self._out.drain()
                reader.expect_end()
                return total
            elif rec.type is RecType.PAGEMAP:
                self._page_map(rec.meta)  # type: ignore[arg-type]
            elif rec.type is RecType.PAGES:
                total += self._large(rec)
            else:
                raise ImageError(f"{self.name} is corrupt: unexpected {rec.type.name} record "
                                 "among pages")
        raise ImageError(f"{self.name} is truncated: it ends without its trailer")

    def _page_map(self, pm: PageMap) -> None:
        if pm.pid not in self.targets:
            raise ImageError(f"{self.name} is corrupt: a page map of pid {pm.pid}, "
                             "which it does not hold")
        self.maps.setdefault(pm.pid, []).extend(
            (r.addr, r.addr + r.npages * PAGE, r.depth) for r in pm.runs)

    def _take(self, meta: Pages) -> Tracee:
        """The task a PAGES record goes to, its pages counted as stored."""
        if self.maps:
            raise ImageError(f"{self.name} is corrupt: pages after its page map")
        got = self.targets.get(meta.pid)
        if got is None or not check_pages_fit(got[1], meta.addr, meta.npages):
            raise self._outside(meta.addr)
        self.stored.setdefault(meta.pid, []).append((meta.addr, meta.addr + meta.npages * PAGE))
        return got[0]

    def _large(self, rec: Record) -> int:
        meta: Pages = rec.meta  # type: ignore[assignment]
        t = self._take(meta)
        out = self._out
        if out is None:
            t.write(meta.addr, rec.data)
            faults.point("restore.pages")
        else:
            out.write(t, meta.addr, rec.data)
        return meta.npages

    def _small(self, group: list[Record]) -> int:
        """Small PAGES records, written with one process_vm_writev per task."""
        pieces: dict[int, list] = {}
        n = 0
        for rec in group:
            meta: Pages = rec.meta  # type: ignore[assignment]
            self._take(meta)
            pieces.setdefault(meta.pid, []).append((meta.addr, rec.data))
            n += meta.npages
        for pid, ps in pieces.items():
            self.targets[pid][0].write_many(ps)
            faults.point("restore.pages")
        return n

    def page_map(self, pid: int) -> list[tuple[int, int, int]]:
        """The page map of pid, checked against the pages the image stored:
        (start, end, depth); depth 0 are the stored ones."""
        try:
            rr = runs.merge_tagged(self.maps.get(pid, []))
        except ValueError as e:
            raise ImageError(f"{self.name} is corrupt: its page map of pid {pid} has {e}") from None
        if runs.normalize(self.stored.get(pid, [])) != \
                runs.normalize((s, e) for s, e, d in rr if d == 0):
            raise ImageError(f"{self.name} is corrupt: the pages it stores for pid {pid} do not "
                             "match its page map")
        return rr

    def from_chain(self, chain) -> int:
        """The pages an incremental image left to its parents (image/chain.py
        Chain).  A helper thread reads them from the chain (each record the
        chain reads is a buffer of its own, so the pieces stay valid) while
        this one writes them, gathered, one process_vm_writev per batch."""
        def batches():
            for pid, (t, vmas) in self.targets.items():
                batch: list = []
                held = 0
                for s, e, d in self.page_map(pid):
                    if d == 0:
                        continue
                    if not check_pages_fit(vmas, s, (e - s) // PAGE):
                        raise ImageError(f"{self.name} is corrupt: its page map puts pages at "
                                         f"0x{s:x} outside every saved memory area")
                    for addr, data in chain.read(d, pid, s, e):
                        batch.append((addr, data))
                        held += len(data)
                        if held >= CHAIN_BATCH or len(batch) >= 512:
                            yield t, batch, held
                            batch, held = [], 0
                if batch:
                    yield t, batch, held

        total = 0
        for t, batch, nbytes in prefetch(batches()):
            t.write_many(batch)
            total += nbytes // PAGE
            faults.point("restore.pages")
        return total


def fill_image(targets: dict[int, tuple[Tracee, list[Vma]]], reader: ImageReader, first: Record,
               chain=None) -> int:
    """A restart's pages: the image's, then (incremental) its parents'."""
    fill = PageFill(targets, reader.name)
    total = fill.pour(reader, first)
    if chain is not None:
        total += fill.from_chain(chain)
    elif fill.maps:
        raise ImageError(f"{reader.name} is corrupt: a page map in a full image")
    return total


# --- reconcile a live address space with a saved layout ---------------------------

@dataclass
class Plan:
    gone: list[Span]          # to unmap
    new: list[Vma]            # to map (their pages to come)


def plan(have: list[Vma], want: list[Vma], key: Callable[[Vma], Any], *,
         mapped: list[Span] | None = None, reserved: list[Span] = ()) -> Plan:
    """How to turn an address space laid out as ``have`` into ``want``.  An
    area is kept if ``key`` (None: never kept) gives it the same value on
    both sides; the vDSO and ``reserved`` (the trampoline) stay too.  The
    rest of ``mapped`` (default: the areas of ``have``) goes; the areas of
    ``want`` not kept are mapped anew."""
    wanted = {key(v) for v in want} - {None}
    kept = [v for v in have if key(v) is not None and key(v) in wanted]
    kept_keys = {key(v) for v in kept}
    keep = runs.normalize([(v.start, v.end) for v in have if v.kind in VDSO_KINDS]
                          + [(v.start, v.end) for v in kept] + list(reserved))
    if mapped is None:
        mapped = [(v.start, v.end) for v in have]
    return Plan(gone=runs.subtract(runs.normalize(mapped), keep),
                new=[v for v in want if v.kind not in VDSO_KINDS and key(v) not in kept_keys])


def reconcile(t: Tracee, p: Plan, scratch: Arena, shm: dict) -> None:
    """Carry a plan out: unmap what goes, map the new areas."""
    for s, e in p.gone:
        t.syscall("munmap", s, e - s)
    if p.new:
        map_areas(t, p.new, scratch, shm)


def drop_pages(t: Tracee, ranges: list[Span], *, zeros_if_refused: bool = False) -> None:
    """Pages a task holds that its saved state does not: MADV_DONTNEED, back
    to zeros (anonymous) or to the file's content.  ``zeros_if_refused``
    (private anonymous areas): where the kernel refuses (mlocked), zeros
    are written instead."""
    ranges = list(ranges)
    # independent: one resume in a blank (Tracee.batch); a checked failure stops it
    rets = t.batch([("madvise", (s, e - s, MADV_DONTNEED), not zeros_if_refused)
                    for s, e in ranges])
    for (s, e), ret in zip(ranges, rets):
        if -4096 < ret < 0:
            t.write(s, bytes(e - s))


def clip(spans: list[Span], within: list[Span]) -> list[Span]:
    """The parts of sorted, merged ``spans`` inside ``within`` (sorted,
    merged); a bisection finds the first span of each part of ``within``
    (``spans`` may be thousands of written pages, ``within`` one area)."""
    out: list[Span] = []
    for s, e in within:
        i = max(bisect.bisect_right(spans, (s, 1 << 64)) - 1, 0)
        while i < len(spans) and spans[i][0] < e:
            a, b = max(spans[i][0], s), min(spans[i][1], e)
            if a < b:
                out.append((a, b))
            i += 1
    return out


# --- roll a live process back to a snapshot child's memory (engine/snapshots.py) --

def not_cow(v: Vma) -> bool:
    """An area fork() does not give the child as a copy-on-write copy
    (MAP_SHARED, MADV_DONTFORK `dc`, MADV_WIPEONFORK `wf`)."""
    return v.pages and (v.shared or "dc" in v.vmflags or "wf" in v.vmflags)


def copy_not_cow(t: Tracee, vmas: list[Vma]) -> list[tuple[int, bytearray]]:
    """A copy of the pages of the areas a snapshot child does not share (not_cow)."""
    out = []
    for v in vmas:
        if not_cow(v):
            for addr, n in page_runs(t.pid, [v]):
                buf = bytearray(n * PAGE)
                t.readinto(addr, buf)
                out.append((addr, buf))
    return out


class NotFast(Exception):
    """The fast path of a rollback cannot finish: rebuild the whole address space."""


def _live_runs(pm, start: int, end: int, anon_only: bool) -> list[Span]:
    """The live process's pages in [start, end): present or swapped; in
    private file mappings (``anon_only``) only present anonymous copies: the
    write tracker's uffd-wp markers in their empty slots are swap-type
    entries that PAGEMAP_SCAN reports as PAGE_IS_SWAPPED.  (A written copy
    swapped out since is in the written spans: dropped all the same.)"""
    if not anon_only:
        return runs.normalize([(a, a + n * PAGE) for a, n in pm.runs(start, end)])
    excl = PAGE_IS_PFNZERO | PAGE_IS_FILE
    return runs.normalize(pagemap_scan(pm.fd, start, end, anyof=PAGE_IS_PRESENT, inverted=excl,
                                       mask=excl, return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED))


def roll_back_written(child: Tracee, t: Tracee, vmas: list[Vma], written: list[Span],
                      copies: list[tuple[int, bytearray]]) -> tuple[int, int, list[Span]]:
    """Only what may differ from the snapshot: (pages copied, pages
    dropped, spans touched).  For each area of the snapshot that holds
    pages, C = the snapshot child's pages, L = the live process's pages
    (present or swapped; in private file mappings only their anonymous
    copies), W = spans written since the snapshot (and areas not tracked):
      copy from the child  (C & W) | (C - L)   written, or dropped since
      drop (MADV_DONTNEED) L - C               appeared since: back to zeros
                                               or to the file's content
    Shared areas and DONTFORK/WIPEONFORK ones: their copy, whole, as the
    full path does (another process may have written shared memory).
    Raises NotFast where the kernel refuses a drop."""
    copy: list[Span] = []
    drops: list[tuple[Vma, list[Span], int]] = []
    copied_spans = runs.normalize([(a, a + len(b)) for a, b in copies])
    with PagemapReader(child.pid) as cpm, PagemapReader(t.pid) as lpm:
        for v in vmas:
            if not v.pages or v.kind in VDSO_KINDS:
                continue
            anon_only = v.kind == "file" or v.kind in OBJECT_KINDS
            live = _live_runs(lpm, v.start, v.end, anon_only)
            w = clip(written, [(v.start, v.end)])
            if not_cow(v):
                if v.shared:
                    continue                  # its copy goes back whole, pages are not dropped
                have = clip(copied_spans, [(v.start, v.end)])
            else:
                have = runs.normalize([(a, a + n * PAGE)
                                       for a, n in cpm.runs(v.start, v.end, anon_only=anon_only)])
                copy += runs.normalize(runs.intersect(have, w) + runs.subtract(have, live))
            extra = runs.subtract(runs.normalize(live + w), have)
            if extra:
                # one madvise per gap between the child's pages that holds any
                gaps = runs.subtract([(v.start, v.end)], have)
                drops.append((v, [g for g in gaps if runs.intersect([g], extra)],
                              sum((e - s) // PAGE for s, e in runs.subtract(live, have))))
    # drop first: a drop range never overlaps a page copied
    for v, ranges, _n in drops:
        for s, e in ranges:
            try:
                drop_pages(t, [(s, e)], zeros_if_refused=v.kind == "anon" and not v.shared)
            except OSError as ex:
                raise NotFast(f"madvise(MADV_DONTNEED) at 0x{s:x} failed: {ex.strerror}") from None
    dropped = sum(n for _v, _rs, n in drops)
    faults.point("rollback.dropped")
    copied = copy_pages(child, t, copy)
    for addr, b in copies:
        t.write(addr, b)
        copied += len(b)
    touched = runs.normalize(copy + [r for _v, rs, _n in drops for r in rs] + copied_spans)
    return copied // PAGE, dropped, touched


def _shared_key(v: Vma):
    """Shared areas identical at the snapshot and now are kept by a full
    rollback (another process may map them too); any other area is rebuilt."""
    if not v.shared:
        return None
    return (v.start, v.end, v.kind, v.shm) if v.kind == "shmem" else \
        (v.start, v.end, v.kind, v.path, v.offset)


def roll_back_all(child: Tracee, t: Tracee, now: list[Vma], vmas: list[Vma], shm: list[ShmObject],
                  copies: list[tuple[int, bytearray]], scratch: Arena, reserved: Span) -> int:
    """The whole address space rebuilt as ``vmas``, every page copied from
    the snapshot child: the pages copied.  Kept: the vDSO, the scratch
    (``reserved``), identical shared areas; every other address unmapped."""
    p = plan(now, vmas, _shared_key, mapped=[(0, TASK_SIZE)], reserved=[reserved])
    shmfds: dict[int, int] = {}
    try:
        for o in shm:
            if any(v.kind == "shmem" and v.shm == o.id for v in p.new):
                fd = t.syscall("memfd_create", scratch.cstr(LCR_SHM[7:]), 1)   # MFD_CLOEXEC
                shmfds[o.id] = fd
                t.syscall("ftruncate", fd, o.size)
        reconcile(t, p, scratch, shmfds)
    finally:
        for fd in shmfds.values():
            t.syscall("close", fd, check=False)
    normal = [v for v in vmas if v.pages and not not_cow(v)]
    faults.point("rollback.unmapped")
    n = copy_pages(child, t, [(a, a + k * PAGE) for a, k in page_runs(child.pid, normal)])
    for addr, buf in copies:
        t.write(addr, buf)
        n += len(buf)
    protect_areas(t, p.new)
    return n // PAGE
