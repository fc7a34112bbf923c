"""Memory: the address space of a process (VMAs, page contents, vDSO).

Dump: classify every mapping from /proc/PID/smaps, then copy only the pages
that are present or swapped (pagemap), and for private file mappings only
those that were written (anonymous copies): the rest is re-mapped from the
file at restore.  Restore: map every area at its address inside the new
task, then pour the pages in with process_vm_writev.
"""
from __future__ import annotations

import bisect
import os
import stat
from dataclasses import dataclass

from linuxcr.pipeline import RING, prefetch
import msgspec

from linuxcr.errors import ImageError, NotCheckpointable, RestoreError
from linuxcr.image.kinds import MAX_CONTENT, MemfdState, UnlinkedState
from linuxcr.image.schema import FileDesc, ShmObject, Vma
from linuxcr.image import runs
from linuxcr.image.stream import ImageWriter
from linuxcr.procfs import PagemapReader, SmapsEntry, split_runs
from linuxcr.remote.task import Tracee
from linuxcr.resources.fdkinds import memfd as memfds, unlinked

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
MADVISE = {"hg": 14, "nh": 15, "dd": 16, "dc": 10, "wf": 18}   # vmflag -> MADV_*


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
    if m.path.startswith("/SYSV"):
        return Area(None, f"{where}: SysV shared memory is not supported yet")
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


def page_runs(pid: int, vmas: list[Vma]) -> list[tuple[int, int]]:
    """(address, pages) of every page worth saving, in chunks of at most CHUNK."""
    out: list[tuple[int, int]] = []
    with PagemapReader(pid) as pm:
        for v in vmas:
            if v.pages:
                private_file = v.kind == "file" or v.kind in OBJECT_KINDS   # only COWed pages
                out += split_runs(pm.runs(v.start, v.end, anon_only=private_file), CHUNK // PAGE)
    return out


_RING: list[memoryview] = []


def _ring() -> list[memoryview]:
    """The copy buffers, made once per lcr process: fresh memory is costly
    (zeroing, and on VMs a host fault per page), a tree has many tasks."""
    if not _RING:
        _RING.extend(memoryview(bytearray(CHUNK)) for _ in range(RING))
    return _RING


def dump_pages(tasks: list[tuple[Tracee, list[Vma]]], w: ImageWriter, progress=None) -> int:
    """The pages of every task through one pipeline (not one per task, which
    would drain at every task boundary): a helper thread reads the next
    chunk, of this task or of the next one, while this one checksums and
    writes the previous one out."""
    ring = _ring()

    def chunks():
        i = 0
        for t, vmas in tasks:
            for addr, n in page_runs(t.pid, vmas):
                view = ring[i % RING][: n * PAGE]
                i += 1
                t.readinto(addr, view)
                yield t.pid, addr, view

    total = 0
    for pid, addr, view in prefetch(chunks()):
        w.page_run(pid, addr, view)
        total += len(view) // PAGE
        if progress:
            progress(len(view))
    return total


# --- incremental dump ----------------------------------------------------------

@dataclass
class Changed:
    """What an incremental dump of one task wrote."""
    stored: int                      # pages written as PAGES
    inherited: int                   # pages left to the parents
    runs: list[tuple[int, int, int]]   # the task's page map: (start, end, depth)


def _present(pid: int, vmas: list[Vma]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Byte ranges of the pages worth saving: (of private areas, of shared ones).
    Shared pages are always stored in full: another process may have written
    them, which no per-process tracker sees."""
    private: list[tuple[int, int]] = []
    shared: list[tuple[int, int]] = []
    with PagemapReader(pid) as pm:
        for v in vmas:
            if v.pages:
                got = pm.runs(v.start, v.end, anon_only=v.kind == "file" or v.kind in OBJECT_KINDS)
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
    private, shared = _present(t.pid, vmas)
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
    ring = _ring()

    def chunks():
        for i, batch in enumerate(_batches(ranges)):
            total = sum(e - s for s, e in batch)
            view = ring[i % RING][:total]
            t.readinto_many([(s, e - s) for s, e in batch], view)
            yield batch, view

    n = 0
    for batch, view in prefetch(chunks()):
        off = 0
        for s, e in batch:
            w.page_run(t.pid, s, view[off:off + e - s])
            off += e - s
        n += len(view) // PAGE
        if progress:
            progress(len(view))
    return n


def _dump_by_content(t: Tracee, private, shared, w: ImageWriter, held, hashes, progress) -> Changed:
    import numpy as np
    import xxhash

    h = xxhash.xxh3_64_intdigest
    paddr, phash = hashes if hashes is not None else (np.empty(0, np.uint64), np.empty(0, np.uint64))
    ring = _ring()
    out: list[tuple[int, int, int]] = []
    stored = inherited = 0

    def chunks():
        for i, (s, e) in enumerate(runs.split(private, CHUNK)):
            view = ring[i % RING][: e - s]
            t.readinto(s, view)
            yield s, view

    for s, view in prefetch(chunks()):
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
    """mmap every saved area at its address in the new task (pages come later)."""
    fds: dict[tuple[str, bool], int] = {}
    try:
        for v in vmas:
            if v.kind in VDSO_KINDS:
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
            t.syscall("mmap", v.start, v.end - v.start, prot, flags, fd, off)
            for flag, advice in MADVISE.items():
                if flag in v.vmflags:
                    t.syscall("madvise", v.start, v.end - v.start, advice, check=False)
    finally:
        for fd in fds.values():
            t.syscall("close", fd, check=False)


def protect_areas(t: Tracee, vmas: list[Vma]) -> None:
    """Drop the write permission we added to fill pages in."""
    for v in vmas:
        if v.pages and not v.prot & PROT_WRITE and v.kind not in VDSO_KINDS:
            t.syscall("mprotect", v.start, v.end - v.start, v.prot)


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
