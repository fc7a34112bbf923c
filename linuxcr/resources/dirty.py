"""Page-exact write tracking (incremental checkpoints, pre-copy migration).

Soft-dirty is not built into every kernel (not into this one).  This uses a
userfaultfd registered in write-protect *async* mode (UFFD_FEATURE_WP_ASYNC,
Linux 6.7) with UFFD_FEATURE_WP_UNPOPULATED, and ioctl(PAGEMAP_SCAN) on
/proc/PID/pagemap: a write to a write-protected page is resolved by the
kernel itself (nobody reads the userfaultfd; it only clears the page's
uffd-wp bit), and PAGEMAP_SCAN with PM_SCAN_WP_MATCHING returns the pages
without the bit (PAGE_IS_WRITTEN) and sets it again, atomically per page.

How it is set up (Tracker.start, the process frozen by the caller):
  - userfaultfd() is injected into the task: a userfaultfd works on the mm
    of the task that created it (ctx->mm).  Always with UFFD_USER_MODE_ONLY:
    the async mode never delivers a fault to a reader, so the flag changes
    nothing for us, and it is what lets an ordinary user create one when
    vm.unprivileged_userfaultfd is 0.
  - lcr takes its own copy with pidfd_open + pidfd_getfd, and the task's fd
    is closed again (injected close) at once: the task never holds it.
  - UFFDIO_API, UFFDIO_REGISTER and UFFDIO_WRITEPROTECT all work from lcr's
    copy (they act on ctx->mm): no further injection; the injected ioctl is
    kept only as a fallback for UFFDIO_API.  So collect() can register the
    process's new mappings while it runs, without ptrace.

Findings on this kernel (6.18):
  - Registers with WP_ASYNC: every VMA but the kernel's own: private and
    shared anonymous, heap, stack (growsdown), private file mappings
    (text, data, read-only), MAP_SHARED file, shmem and memfd mappings.
    [vvar], [vvar_vclock], [vdso] fail with EINVAL (VM_PFNMAP/special);
    [vsyscall] is no VMA at all.  A shared file mapping opened read-only
    (no VM_MAYWRITE) fails with EPERM.  An area another userfaultfd holds
    fails with EBUSY.  Each failure is one entry of ``untracked``, every
    interval (it is retried only when the area changes).
  - WP_UNPOPULATED matters: PAGEMAP_SCAN treats an anonymous VMA as
    write-trackable (PAGE_IS_WPALLOWED) only with it.
  - PAGEMAP_SCAN counts an empty page-table slot without a uffd-wp marker
    as PAGE_IS_WRITTEN, and WP_MATCHING on it installs a marker (page
    tables get allocated: ~2 MiB per GiB).  So the scans differ by kind of
    mapping (collect() cuts the address space where anonymous private
    mappings begin and end, one ioctl per piece):
      anonymous private: written = present or swapped, no uffd-wp bit, not
        the zero page.  An empty slot is a page never written (or dropped:
        it reads as zeros, and is not present at the dump).  No marker is
        ever installed, so huge sparse reservations cost nothing.  First
        reset: only present/swapped pages are write-protected.  A page only
        read maps the zero page (PAGE_IS_PFNZERO): never reported.
      anything else (file, shmem, memfd): written = no uffd-wp bit, empty
        slots included.  First reset: UFFDIO_WRITEPROTECT over the whole
        range, which puts markers into the empty slots, so that a page only
        read in later keeps the bit; an empty slot later means a page
        written and then evicted (shmem swap, writeback), or an area grown.
  - PM_SCAN_CHECK_WPASYNC is not used: it fails the whole scan with EPERM
    at the first VMA not registered ([vdso] always is one).  WP_MATCHING
    without it skips such VMAs; collect() finds them with a second scan
    (inverted PAGE_IS_WPALLOWED, which walks only unregistered areas) plus
    a one-page probe for mappings not seen before (the scan skips
    VM_PFNMAP areas such as [vvar]).
  - Growth: brk() never extends a registered heap VMA (the flags differ:
    the new part is a new VMA), so it comes back in ``untracked`` once and
    is tracked from then on.  Stack growth (and mremap growing in place)
    extends the registered VMA itself: the new pages start unpopulated, a
    write there creates a page without the uffd-wp bit, so it is reported
    as written; nothing is missed.
  - mremap that moves an area drops its registration (no
    UFFD_FEATURE_EVENT_REMAP): the moved area is reported untracked once,
    then registered again.  munmap'd areas simply vanish, new mmaps are
    untracked once.
  - Writes the kernel does for the task (read(2) into a tracked buffer) are
    resolved like user writes: tracked, no EFAULT, no SIGBUS, also with
    UFFD_USER_MODE_ONLY as an ordinary user.
  - fork(): without UFFD_FEATURE_EVENT_FORK the child's VMAs are reset
    (no registration, uffd-wp bits cleared on copy): the child runs
    unaffected; the parent stays tracked (its COW writes are reported).
    Threads share the mm: tracked alike.
  - close(): when lcr's copy is the last reference, userfaultfd_release
    unregisters every VMA and clears the uffd-wp bits and markers: smaps
    shows no ``uw`` afterwards.  A copy inherited by a child of lcr that
    did not exec keeps the registration alive (the fd is O_CLOEXEC).
  - Cost (1 GiB memhog, 4 KiB pages, 2 CPUs): Tracker.start 12-14 ms
    (registering and write-protecting 1 GiB; freeze+start+thaw ~21 ms);
    collect with a handful of pages written 0.4-2 ms, with ~700 pages
    ~2 ms, ~3600 pages ~4 ms; close 9-22 ms (the kernel unprotects).  The
    application pays one minor fault on its first write to a page after
    each reset.  WP_MATCHING on part of a THP splits it.
  - Not seen as writes: pages dropped (MADV_DONTNEED, MADV_FREE): an
    anonymous page reads as zeros again, a private file page shows the
    file again -- their content changed without a write.  Callers must take
    the set of pages worth saving at the time of the dump (present, and in
    private file mappings anonymous: PagemapReader.runs(anon_only=True))
    and treat every other page as a hole / the file's, as the full dump
    does; a page in that set and not written holds what it held at the
    last reset.
    Shared memory (MAP_SHARED, shmem, memfd) is tracked only for writes
    through this process's page tables: writes by other processes mapping
    it, or write(2)/fallocate on the file, are not seen.
"""
from __future__ import annotations

import bisect
import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from linuxcr import faults
from linuxcr.errors import KernelError, NoSuchProcess, PermissionDenied
from linuxcr.procfs import MapEntry, read_maps
from linuxcr.sys import uffd as U
from linuxcr.sys.syscalls import TASK_SIZE

if TYPE_CHECKING:
    from linuxcr.remote.task import Arena, Tracee

METHOD_UFFD = "uffd-wp-async"
METHOD_HASH = "content-hash"

PAGE = os.sysconf("SC_PAGE_SIZE")
FEATURES = U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED
UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY

Range = tuple[int, int]


# --------------------------------------------------------------------------
# the result of one interval

@dataclass
class Dirty:
    """What changed in one interval.

    ``written``: (addr, npages) runs of pages written since the last reset,
    sorted and merged.  ``untracked``: (start, end) areas that were not
    tracked over the whole interval (new or moved mappings, areas that
    cannot be registered): every page in them counts as written.
    ``is_written`` and ``runs_within`` answer for both together."""
    written: list[tuple[int, int]]
    untracked: list[tuple[int, int]]
    _spans: list[Range] | None = field(default=None, repr=False, compare=False)
    _starts: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def pages(self) -> int:
        """Pages in ``written`` (the untracked areas not counted)."""
        return sum(n for _, n in self.written)

    def spans(self) -> list[Range]:
        """``written`` and ``untracked`` as sorted, merged (start, end)."""
        if self._spans is None:
            allr = sorted([(a, a + n * PAGE) for a, n in self.written] + list(self.untracked))
            self._spans = _merge(allr)
            self._starts = [s for s, _ in self._spans]
        return self._spans

    def is_written(self, addr: int, *, include_untracked: bool = True) -> bool:
        """Is the page holding ``addr`` to be treated as written?"""
        if include_untracked:
            spans = self.spans()
            i = bisect.bisect_right(self._starts, addr) - 1
            return i >= 0 and addr < spans[i][1]
        i = bisect.bisect_right(self.written, (addr, float("inf"))) - 1
        return i >= 0 and addr < self.written[i][0] + self.written[i][1] * PAGE

    def runs_within(self, start: int, end: int, *, include_untracked: bool = True
                    ) -> list[tuple[int, int]]:
        """(addr, npages) runs of pages to treat as written, clipped to
        [start, end) (page-aligned bounds).  ``include_untracked=False``:
        only the pages seen written."""
        if include_untracked:
            spans = self.spans()
            starts = self._starts
        else:
            spans = [(a, a + n * PAGE) for a, n in self.written]
            starts = [a for a, _ in self.written]
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        out = []
        while i < len(spans) and spans[i][0] < end:
            s, e = max(spans[i][0], start), min(spans[i][1], end)
            if s < e:
                out.append((s, (e - s) // PAGE))
            i += 1
        return out


def _merge(ranges: list[Range]) -> list[Range]:
    """Sorted ranges with overlapping and touching ones joined (image/runs.py)."""
    from linuxcr.image.runs import normalize
    return normalize(ranges)


# --------------------------------------------------------------------------
# can it work here?

_kernel_ok: tuple[bool, str] | None = None


def _probe_kernel() -> tuple[bool, str]:
    try:
        fd = U.userfaultfd(UFFD_FLAGS)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return False, "the kernel has no userfaultfd (CONFIG_USERFAULTFD off)"
        if e.errno in (errno.EPERM, errno.EACCES):
            return False, f"userfaultfd() is not permitted here ({e.strerror}; seccomp?)"
        if e.errno == errno.EINVAL:
            return False, "the kernel lacks UFFD_USER_MODE_ONLY (Linux 5.11+)"
        return False, f"userfaultfd() failed: {e.strerror}"
    try:
        U.api(fd, FEATURES)
    except OSError as e:
        return False, f"the kernel lacks userfaultfd WP_ASYNC/WP_UNPOPULATED (Linux 6.7+): {e.strerror}"
    finally:
        os.close(fd)
    try:
        pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open /proc/self/pagemap: {e.strerror}"
    try:
        U.scan(pm, 0, PAGE, return_mask=U.PAGE_IS_PRESENT, anyof=U.PAGE_IS_PRESENT, vec_len=1)
    except OSError as e:
        return False, f"the kernel lacks ioctl(PAGEMAP_SCAN) (Linux 6.7+): {e.strerror}"
    finally:
        os.close(pm)
    return True, ""


def available(pid: int | None = None) -> tuple[bool, str]:
    """Can write tracking work here (kernel features, permissions)?
    (True, "") or (False, reason in one line)."""
    global _kernel_ok
    if _kernel_ok is None:
        _kernel_ok = _probe_kernel()
    if not _kernel_ok[0] or pid is None:
        return _kernel_ok
    try:
        os.close(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        return False, f"pid {pid}: no such process"
    except OSError as e:
        return False, f"pid {pid}: cannot open /proc/{pid}/pagemap: {e.strerror}"
    return True, ""


# --------------------------------------------------------------------------
# the tracker

class Tracker:
    """lcr's userfaultfd of one process (its mm), and its pagemap."""

    method = METHOD_UFFD

    def __init__(self, pid: int, uffd: int) -> None:
        self.pid = pid
        self.uffd = uffd
        self._pagemap = -1
        # every mapping at the last look: (start, end) -> write-tracked?
        self._known: dict[Range, bool] = {}
        # mappings that could not be registered -> why (not retried while
        # the mapping stays the same)
        self._failed_why: dict[Range, str] = {}
        # [0, TASK_SIZE) cut where anonymous private mappings begin and end:
        # (start, end, anon) for the written-page scans
        self._classes: list[tuple[int, int, bool]] = [(0, TASK_SIZE, False)]
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            os.close(uffd)
            self.uffd = -1
            raise _proc_error(pid, e, "open /proc/PID/pagemap") from None

    # --- creation ---------------------------------------------------------------
    @classmethod
    def start(cls, t: "Tracee", arena: "Arena") -> "Tracker":
        """Create the userfaultfd inside the stopped task ``t`` (t.insn set),
        take lcr's copy, close the task's, register every mapping it can and
        write-protect every page (the first reset).  KernelError (nothing
        left in the task) if tracking cannot work."""
        pid = t.pid
        try:
            tfd = t.syscall("userfaultfd", UFFD_FLAGS)
            faults.point("track.uffd")
        except OSError as e:
            raise KernelError(f"pid {pid}: userfaultfd() inside the process failed: "
                              f"{os.strerror(e.errno)}", "write tracking is not possible here") from None
        from linuxcr.remote.task import taken_fd
        try:
            with taken_fd(t, tfd) as ours:
                _api(ours, t, arena, tfd)
        except OSError as e:
            raise KernelError(f"pid {pid}: cannot set up its userfaultfd: {e.strerror}") from None
        self = cls(pid, ours)
        try:
            maps = _user_maps(pid)
            self._register(maps, initial=True)
            self._classes = _partition(maps)
        except OSError as e:
            self.close()
            raise _proc_error(pid, e, "registering its memory for write tracking") from None
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def adopt(cls, pid: int, uffd: int) -> "Tracker":
        """Take over ``uffd`` (ours now: closed by close()), a userfaultfd of
        ``pid`` set up as start() does, handed back e.g. over SCM_RIGHTS."""
        if not U.is_userfaultfd(uffd):
            raise KernelError(f"pid {pid}: fd {uffd} handed back is not a userfaultfd")
        feats = U.fdinfo_features(uffd)
        if feats is not None and (feats & FEATURES) != FEATURES:
            raise KernelError(f"pid {pid}: the userfaultfd handed back lacks WP_ASYNC "
                              f"(features 0x{feats:x})")
        self = cls(pid, uffd)
        try:
            self._classes = _partition(_user_maps(pid))
        except OSError as e:
            self.close()
            raise _proc_error(pid, e, "reading /proc/PID/maps") from None
        return self

    # --- one interval -------------------------------------------------------------
    def collect(self, reset: bool = True) -> Dirty:
        """Pages written since the last reset, and (reset) write-protect them
        again, atomically per page.  The process may be running.  Mappings
        not registered yet are registered now (reset only) and reported in
        ``untracked`` for this interval."""
        flags = U.PM_SCAN_WP_MATCHING if reset else 0
        written: list[tuple[int, int]] = []
        try:
            for s, e, anon in self._classes:
                for rs, re_, _ in U.scan(self._pagemap, s, e, flags=flags, **_MATCH[anon]):
                    n = (re_ - rs) // PAGE
                    if written and written[-1][0] + written[-1][1] * PAGE == rs:
                        written[-1] = (written[-1][0], written[-1][1] + n)
                    else:
                        written.append((rs, n))
            maps = _user_maps(self.pid)
            unreg = self._unregistered(maps)
            if reset:
                self._register(unreg)
            self._classes = _partition(maps)
        except OSError as e:
            raise _proc_error(self.pid, e, "PAGEMAP_SCAN") from None
        return Dirty(written=written, untracked=_merge(sorted((m.start, m.end) for m in unreg)))

    def tracked_areas(self) -> list[Range]:
        """(start, end) of the areas write-tracked now (PAGE_IS_WPALLOWED)."""
        return [(s, e) for s, e, _ in U.scan(self._pagemap, 0, TASK_SIZE, mask=U.PAGE_IS_WPALLOWED,
                                             return_mask=U.PAGE_IS_WPALLOWED)]

    def _is_tracked(self, addr: int) -> bool:
        return bool(U.scan(self._pagemap, addr, addr + PAGE, mask=U.PAGE_IS_WPALLOWED,
                           return_mask=U.PAGE_IS_WPALLOWED, vec_len=1))

    def _unregistered(self, maps: list[MapEntry]) -> list[MapEntry]:
        """The mappings not write-tracked now.  One PAGEMAP_SCAN finds the
        ordinary ones (it walks only areas without PAGE_IS_WPALLOWED); the
        kernel's VM_PFNMAP areas it skips are those that failed before, or,
        for mappings not seen before, asked one page each."""
        found = U.scan(self._pagemap, 0, TASK_SIZE, inverted=U.PAGE_IS_WPALLOWED,
                       mask=U.PAGE_IS_WPALLOWED, return_mask=U.PAGE_IS_WPALLOWED)
        inv = _merge([(s, e) for s, e, _ in found])
        out = []
        known: dict[Range, bool] = {}
        for m in maps:
            key = (m.start, m.end)
            if _overlaps(m.start, m.end, inv):
                tracked = False
            else:
                tracked = self._known.get(key)
                if tracked is None:
                    tracked = self._is_tracked(m.start)
            known[key] = tracked
            if not tracked:
                out.append(m)
        self._known = known
        self._failed_why = {k: v for k, v in self._failed_why.items() if k in known}
        return out

    def _register(self, maps: list[MapEntry], *, initial: bool = False) -> None:
        """Register each mapping and write-protect it (its first reset).
        Failures are remembered (self._known False) and not retried while
        the mapping stays the same."""
        for m in maps:
            key = (m.start, m.end)
            if key in self._failed_why:
                continue                                 # failed before, unchanged since
            try:
                U.register(self.uffd, m.start, m.end - m.start, U.UFFDIO_REGISTER_MODE_WP)
            except OSError as ex:
                if ex.errno == errno.ENOMEM and not initial:
                    continue                             # unmapped meanwhile
                self._known[key] = False
                self._failed_why[key] = f"{m.path or 'anonymous'}: {ex.strerror}"
                continue
            try:
                self._first_reset(m)
            except OSError as ex:
                if ex.errno in (errno.ENOENT, errno.ENOMEM, errno.EINVAL) and not initial:
                    continue                             # changed meanwhile: next time
                raise
            self._known[key] = True
            self._failed_why.pop(key, None)

    def _first_reset(self, m: MapEntry) -> None:
        if _anon_private(m):
            # present pages only: nothing to populate in sparse areas
            U.scan(self._pagemap, m.start, m.end, flags=U.PM_SCAN_WP_MATCHING,
                   anyof=U.PAGE_IS_PRESENT | U.PAGE_IS_SWAPPED, return_mask=U.PAGE_IS_PRESENT,
                   vec_len=64)
        else:
            U.writeprotect(self.uffd, m.start, m.end - m.start, True)

    def failures(self) -> dict[Range, str]:
        """Mappings that could not be registered, and why."""
        return dict(self._failed_why)

    # --- end ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close lcr's copy: the last reference, so the kernel unregisters
        every area and removes the write protection."""
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def track(pid: int) -> Tracker:
    """Freeze ``pid`` (every thread), start tracking it, let it run again:
    Tracker.start for a process nobody holds yet."""
    from linuxcr.remote.freezer import Frozen
    from linuxcr.remote.task import Arena

    fr = Frozen(pid)
    try:
        fr.freeze()
        t = fr.leader
        vdso = next(((m.start, m.end) for m in read_maps(pid) if m.path == "[vdso]"), None)
        t.insn = t.find_syscall_insn(vdso)
        for th in fr.threads.values():
            th.insn = t.insn
        fr.block_signals()
        with t.scratch() as addr:
            tracker = Tracker.start(t, Arena(t, addr, PAGE))
        fr.unblock_signals()
    finally:
        fr.thaw()
    return tracker


def _api(ours: int, t: "Tracee", arena: "Arena", tfd: int) -> None:
    """UFFDIO_API from lcr's copy; injected into the task if that fails."""
    try:
        feats, _ = U.api(ours, FEATURES)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise KernelError(f"pid {t.pid}: the kernel lacks userfaultfd WP_ASYNC/WP_UNPOPULATED "
                              "(Linux 6.7+)") from None
        a = U.uffdio_api(api=U.UFFD_API, features=FEATURES, ioctls=0)
        at = arena.put(bytes(a))
        t.syscall("ioctl", tfd, U.UFFDIO_API, at)
        feats = U.uffdio_api.from_buffer_copy(t.read(at, len(bytes(a)))).features
    if feats & FEATURES != FEATURES:
        raise KernelError(f"pid {t.pid}: userfaultfd without WP_ASYNC (features 0x{feats:x})")


# What counts as written, by kind of mapping.  Anonymous private: pages
# present or swapped without the uffd-wp bit, not the zero page; an empty
# slot is a page never written (or dropped: then it reads as zeros and is
# not present at the dump).  Other mappings (file, shmem): anything without
# the bit, empty slots included: those had markers after the first reset,
# so an empty slot is a page written and then evicted (shmem swap, file
# writeback) or an area grown since.
_MATCH = {
    True: dict(anyof=U.PAGE_IS_PRESENT | U.PAGE_IS_SWAPPED, mask=U.PAGE_IS_WRITTEN | U.PAGE_IS_PFNZERO,
               inverted=U.PAGE_IS_PFNZERO, return_mask=U.PAGE_IS_WRITTEN),
    False: dict(anyof=U.PAGE_IS_WRITTEN, mask=U.PAGE_IS_PFNZERO, inverted=U.PAGE_IS_PFNZERO,
                return_mask=U.PAGE_IS_WRITTEN),
}


def _anon_private(m: MapEntry) -> bool:
    return m.is_anon and m.private


def _user_maps(pid: int) -> list[MapEntry]:
    return [m for m in read_maps(pid) if m.end <= TASK_SIZE]


def _partition(maps: list[MapEntry]) -> list[tuple[int, int, bool]]:
    """[0, TASK_SIZE) in ranges of one kind each; the gap below a mapping
    goes with it (a stack grows down into it)."""
    out: list[tuple[int, int, bool]] = []
    for m in maps:
        anon = _anon_private(m)
        if not out:
            out.append((0, m.end, anon))
        elif out[-1][2] == anon:
            out[-1] = (out[-1][0], m.end, anon)
        else:
            out.append((out[-1][1], m.end, anon))
    if not out:
        return [(0, TASK_SIZE, False)]
    out[-1] = (out[-1][0], TASK_SIZE, out[-1][2])
    return out


def _overlaps(s: int, e: int, ranges: list[Range]) -> bool:
    i = bisect.bisect_right(ranges, (s, TASK_SIZE * 2)) - 1
    if i >= 0 and ranges[i][1] > s:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] < e


def _proc_error(pid: int, e: OSError, what: str) -> Exception:
    if e.errno in (errno.ESRCH, errno.ENOENT):
        return NoSuchProcess(f"pid {pid}: no such process ({what})")
    if e.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"pid {pid}: {what}: {e.strerror}")
    return KernelError(f"pid {pid}: {what} failed: {e.strerror}")
