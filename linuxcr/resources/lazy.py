"""Lazy restore (`lcr restart --lazy`): the process runs before its pages are in.

How it goes (engine/restore.py calls ``start`` once every task's areas are
mapped, before the tasks are finished):
  - In each task a userfaultfd is created by an injected userfaultfd()
    (it works on the mm of the task that creates it), lcr takes its own
    copy with pidfd_getfd and the task's fd is closed again.  UFFDIO_API
    (EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP) and
    UFFDIO_REGISTER (MISSING) of every private anonymous area holding
    saved pages are done from lcr's copy.  Not UFFD_USER_MODE_ONLY: a
    fault the kernel takes for the task (read(2) into a lazy buffer) must
    wait for its page too, not fail with EFAULT; so this needs root, or
    CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1.
  - The image's PAGES records are skimmed (ImageReader(skim=True): only
    their metadata is read; the trailer is checked).  Pages that lie in a
    registered area go into the page index (address -> record, offset);
    every other page (file mappings, shared memory, areas that could not
    be registered) is written at once as a normal restart does.
  - A page server is forked off (daemonised: its own session; it keeps
    only the image fd, the userfaultfds and its log) and a watchdog is
    forked off the server.  The server serves faults first (UFFDIO_COPY
    of the whole remaining piece of the record the page is in; a fault
    on a page the image does not hold: UFFDIO_ZEROPAGE), and between
    faults streams the rest of the index in, record by record.  It exits
    when every page is in (closing the userfaultfds unregisters the areas).
  - lcr finishes the tasks (the server already serves their faults: the
    kernel may touch lazy pages during the finish) and returns: time to
    running.  The server logs time to complete.

Events (non-cooperative userfaultfd):
  - fork: the child's areas are registered on a new userfaultfd handed to
    the server in the message; the child's index is a copy of the parent's
    at that moment (a page missing in the parent is missing in the child
    too; UFFDIO_COPY into the parent fails with EAGAIN until the event is
    read, so nothing slips between).  Each process gets its own copy of a
    page filled after the fork (no copy-on-write sharing of those).
  - mremap: the index moves with the area.  munmap, MADV_DONTNEED /
    MADV_REMOVE: the range leaves the index (it reads as zeros, or is
    gone).
  - threads faulting at once: each fault is a message; served in turn.
  - UFFDIO_COPY meeting a page already there (EEXIST): skipped, the copy
    goes on after it; EAGAIN (an event pending): events first, then again;
    ESRCH (the process exited or exec'd): that mm is dropped.

Faults:
  - The image is read by the server through the fd lcr opened: removing
    the file changes nothing; truncating it (or corrupting it: every
    record's checksum is checked when it is read) makes the server kill
    the tree (SIGKILL, root and descendants), log why and exit.
  - The watchdog holds a socket the server writes "done" to when every
    page is in.  End of file without it (the server died): SIGKILL the
    tree.  A watchdog killed alone is replaced by the server at once.  The watchdog also holds copies of every userfaultfd (inherited,
    and those forks hand over, sent to it with SCM_RIGHTS), so the
    faulting threads keep waiting (not running on zero pages) until it has
    killed them.  If the server and the watchdog are killed at the same
    time, the last reference to each userfaultfd goes, the kernel
    unregisters the areas and a page not yet in reads as zeros: the tree
    runs on with wrong memory.  They are in separate process groups (a
    group kill of one misses the other); killing both deliberately (or
    the OOM killer taking both) is the case --lazy cannot protect against.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import os
import select
import signal
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from linuxcr import faults
from linuxcr.errors import ImageError, KernelError, LcrError, RestoreError
from linuxcr.image.schema import Header, Pages, RecType, Task, Vma
from linuxcr.image.stream import PAGE, ImageReader, Record
from linuxcr.resources import pstree
from linuxcr.sys import uffd as U
from linuxcr.sys.syscalls import close_all_but

if TYPE_CHECKING:
    from linuxcr.remote.task import Tracee

FEATURES = U.UFFD_FEATURE_EVENT_FORK | U.UFFD_FEATURE_EVENT_REMAP | U.UFFD_FEATURE_EVENT_REMOVE \
    | U.UFFD_FEATURE_EVENT_UNMAP
UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
STREAM_BYTES = 4 << 20          # background copy: at most this much between looks at faults
MSGS = 64                       # messages read at once
# Seconds to wait after each background chunk: a slow disk, for tests and
# benchmarks (faults are served without it).
PACE_ENV = "LCR_LAZY_PACE"


# --------------------------------------------------------------------------
# checks before anything is made

def check_source(fd: int, name: str) -> None:
    """--lazy reads pages later, at any offset: the image must be a regular file."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ImageError(f"cannot read {name}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a pipe" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise RestoreError(f"{name}: --lazy needs the image in a file it can seek in; this is {what}",
                           "write the image to a file first, or restart without --lazy")


def check_image(reader: ImageReader, header: Header, tasks: list[Task]) -> None:
    """What --lazy does not take: signed images read with --verify (the
    signature covers every byte, so every byte is read first), incremental
    images, trees whose tasks share pages with their parents."""
    if not reader.skim:
        raise RestoreError(f"{reader.name}: --lazy cannot check a signature (it covers pages "
                           "read only later)", "restart without --lazy, or without --verify")
    if header.parent is not None:
        raise RestoreError(f"{reader.name} is an incremental image: --lazy takes full images only",
                           "restart without --lazy")
    if any(k.cow for k in tasks):
        raise RestoreError(f"{reader.name} holds a tree whose tasks share pages: --lazy does not "
                           "restore that", "restart without --lazy")


def lazy_area(v: Vma) -> bool:
    """Areas whose pages come on demand: private anonymous ones holding
    saved pages (heap, stack, anonymous mmaps)."""
    return v.kind == "anon" and not v.shared and v.pages and v.prot != 0


# --------------------------------------------------------------------------
# the page index of one mm

class Extents:
    """Sorted, non-overlapping pieces (start, end, record, offset): the bytes
    [start, end) of the mm are those at ``offset`` in the record's data."""

    def __init__(self, items: list[tuple[int, int, int, int]] | None = None) -> None:
        self.items = items or []
        self.starts = [p[0] for p in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def bytes(self) -> int:
        return sum(e - s for s, e, _r, _o in self.items)

    def copy(self) -> "Extents":
        return Extents(list(self.items))

    def add(self, piece: tuple[int, int, int, int]) -> None:
        i = bisect.bisect_left(self.starts, piece[0])
        self.items.insert(i, piece)
        self.starts.insert(i, piece[0])

    def find(self, addr: int) -> int:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.items[i][1] > addr:
            return i
        return -1

    def pop(self, i: int) -> tuple[int, int, int, int]:
        del self.starts[i]
        return self.items.pop(i)

    def take(self, budget: int) -> list[tuple[int, int, int, int]]:
        """The first pieces, until they hold ``budget`` bytes (at least one),
        out in one cut: popping the front piece by piece moves the whole
        list each time (2.8 s for 131072 pieces, a 1 GiB image of every
        other page)."""
        n = total = 0
        while n < len(self.items) and total < budget:
            total += self.items[n][1] - self.items[n][0]
            n += 1
        out = self.items[:n]
        del self.items[:n]
        del self.starts[:n]
        return out

    def cut(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """Take [start, end) out; the pieces taken (clipped), in order."""
        if start >= end or not self.items:
            return []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        j = i
        taken, keep = [], []
        while j < len(self.items) and self.items[j][0] < end:
            s, e, r, o = self.items[j]
            if e <= start:
                keep.append(self.items[j])
            else:
                if s < start:
                    keep.append((s, start, r, o))
                if e > end:
                    keep.append((end, e, r, o + (end - s)))
                cs, ce = max(s, start), min(e, end)
                taken.append((cs, ce, r, o + (cs - s)))
            j += 1
        self.items[i:j] = keep
        self.starts[i:j] = [p[0] for p in keep]
        return taken

    def move(self, frm: int, to: int, length: int) -> None:
        for s, e, r, o in self.cut(frm, frm + length):
            self.add((s - frm + to, e - frm + to, r, o))


@dataclass
class Mm:
    uffd: int
    index: Extents
    pid: int = 0                # the task it was made in (0: a child forked later)


# --------------------------------------------------------------------------
# set up, in lcr

@dataclass
class Lazy:
    """What start() did: pages written now and left to the server."""
    eager_pages: int = 0
    lazy_pages: int = 0
    server: int = 0
    watchdog: int = 0
    log: str = ""


@dataclass
class _Setup:
    mms: list[Mm] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)


def make_uffd(t: "Tracee", vmas: list[Vma]) -> tuple[int, list[tuple[int, int]]]:
    """A userfaultfd of the stopped task ``t`` (created inside it, ours
    now, the task's closed) with its lazy areas registered in MISSING
    mode: (our fd, the areas registered).  Areas the kernel refuses are
    left out (their pages get written at once)."""
    pid = t.pid
    try:
        tfd = t.syscall("userfaultfd", UFFD_FLAGS)
        faults.point("lazy.uffd")
    except OSError as e:
        hint = "restart without --lazy" + (", or as root (vm.unprivileged_userfaultfd is 0)"
                                           if e.errno == errno.EPERM else "")
        raise KernelError(f"pid {pid}: userfaultfd() inside the restored process failed: "
                          f"{os.strerror(e.errno)}", hint) from None
    from linuxcr.remote.task import taken_fd
    try:
        with taken_fd(t, tfd) as ours:
            feats, _ = U.api(ours, FEATURES)
            if feats & FEATURES != FEATURES:
                raise KernelError(f"pid {pid}: userfaultfd without fork/remap/remove/unmap events "
                                  f"(features 0x{feats:x})", "restart without --lazy")
            done: list[tuple[int, int]] = []
            for v in vmas:
                if not lazy_area(v):
                    continue
                try:
                    U.register(ours, v.start, v.end - v.start, U.UFFDIO_REGISTER_MODE_MISSING)
                except OSError:
                    continue                    # written at once instead
                done.append((v.start, v.end))
            return ours, done
    except OSError as e:
        raise KernelError(f"pid {pid}: cannot set up its userfaultfd: {e.strerror}",
                          "restart without --lazy") from None


def _inside(areas: list[tuple[int, int]], s: int, e: int) -> list[tuple[int, int, bool]]:
    """[s, e) cut into pieces in (True) and out of (False) the sorted areas."""
    out: list[tuple[int, int, bool]] = []
    pos = s
    i = max(bisect.bisect_right(areas, (s, 1 << 64)) - 1, 0)
    while pos < e:
        while i < len(areas) and areas[i][1] <= pos:
            i += 1
        if i < len(areas) and areas[i][0] <= pos:
            hi = min(e, areas[i][1])
            out.append((pos, hi, True))
        else:
            hi = min(e, areas[i][0]) if i < len(areas) else e
            out.append((pos, hi, False))
        pos = hi
    return out


def start(targets: dict[int, tuple["Tracee", list[Vma]]], reader: ImageReader, first: Record,
          *, root: int, t0: float, log: str | None = None) -> Lazy:
    """Register every task's lazy areas, index the image's pages, write
    those outside lazy areas now, and fork the page server off.  On failure
    nothing is left (the caller kills the tasks)."""
    setup = _Setup()
    areas: dict[int, list[tuple[int, int]]] = {}
    try:
        for pid, (t, vmas) in targets.items():
            fd, got = make_uffd(t, vmas)
            setup.mms.append(Mm(fd, Extents(), pid))
            areas[pid] = got
        res = Lazy()
        by_pid = {m.pid: m for m in setup.mms}
        rec = first
        while rec.type is not RecType.TRAILER:
            if rec.type is not RecType.PAGES:
                raise ImageError(f"{reader.name} is corrupt: unexpected {rec.type.name} record "
                                 "among pages (--lazy takes full images only)")
            meta: Pages = rec.meta  # type: ignore[assignment]
            got = targets.get(meta.pid)
            if got is None or not _fits(got[1], meta.addr, meta.npages):
                raise ImageError(f"{reader.name} is corrupt: pages at 0x{meta.addr:x} lie "
                                 "outside every saved memory area")
            end = meta.addr + meta.npages * PAGE
            data = None
            for s, e, lazy in _inside(areas[meta.pid], meta.addr, end):
                if lazy:
                    by_pid[meta.pid].index.add((s, e, len(setup.records), s - meta.addr))
                    res.lazy_pages += (e - s) // PAGE
                else:
                    if data is None:
                        data = reader.read_skimmed(rec)
                    got[0].write(s, data[s - meta.addr:e - meta.addr])
                    res.eager_pages += (e - s) // PAGE
            setup.records.append(rec)
            rec = reader.next()
        reader.expect_end()
        faults.point("lazy.indexed")
        if log is None:
            log = os.path.join(tempfile.gettempdir(), f"lcr-lazy-{root}.log")
        res.log = log
        res.server, res.watchdog = _fork_server(setup, reader, root, t0, log)
        return res
    finally:
        for m in setup.mms:
            os.close(m.uffd)


def _fits(vmas: list[Vma], addr: int, npages: int) -> bool:
    end = addr + npages * PAGE
    return any(v.start <= addr and end <= v.end for v in vmas)


def _fork_server(setup: _Setup, reader: ImageReader, root: int, t0: float,
                 log: str) -> tuple[int, int]:
    """Fork the daemonised page server (and its watchdog); their pids."""
    try:
        logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise RestoreError(f"cannot open the lazy restore log {log}: {e.strerror}",
                           "give another place with --lazy-log") from None
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:                                      # pragma: no cover (child)
            code = 1
            try:
                os.close(rfd)
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                if reader.fd <= 2:               # stdin: _std_to puts /dev/null there
                    import fcntl
                    reader.fd = fcntl.fcntl(reader.fd, fcntl.F_DUPFD_CLOEXEC, 3)
                srv = Server(setup.mms, setup.records, reader, root, t0, logfd)
                keep = {reader.fd, logfd, wfd, srv.rootfd} | {m.uffd for m in setup.mms}
                close_all_but(keep)
                _std_to(logfd)
                srv.spawn_watchdog(close=wfd)
                os.write(wfd, f"{os.getpid()} {srv.watchdog}\n".encode())
                os.close(wfd)
                code = srv.run()
            except BaseException as e:
                try:
                    os.write(logfd, f"lcr lazy: page server failed: {e!r}\n".encode())
                except OSError:
                    pass
            os._exit(code)
        os.close(wfd)
        wfd = -1
        os.waitpid(pid, 0)
        got = b""
        while not got.endswith(b"\n"):       # one line (the watchdog holds the pipe too)
            k = os.read(rfd, 64)
            if not k:
                break
            got += k
        try:
            server, watchdog = (int(x) for x in got.split())
        except ValueError:
            raise RestoreError("the lazy page server did not start", f"see {log}") from None
        return server, watchdog
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        os.close(logfd)


def _std_to(logfd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)


# --------------------------------------------------------------------------
# the page server (its own process)

def kill_tree(root: int, pidfd: int = -1) -> list[int]:
    """SIGKILL the restored root and its descendants now (stopped first, so
    none forks away meanwhile)."""
    pids = pstree.tree_pids(root) if os.path.exists(f"/proc/{root}") else []
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            try:
                if p == root and pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, sig)
                else:
                    os.kill(p, sig)
            except (ProcessLookupError, OSError):
                pass
    return pids


class Server:
    def __init__(self, mms: list[Mm], records: list[Record], reader: ImageReader, root: int,
                 t0: float, logfd: int) -> None:
        self.mms = {m.uffd: m for m in mms}
        self.records = records
        self.reader = reader
        self.root = root
        self.t0 = t0
        self.logfd = logfd
        self.cache: dict[int, tuple[object, int]] = {}
        self.order: list[int] = []
        self.faults = 0
        self.zero = 0
        self.copied = 0
        self.forks = 0
        self.gone = 0               # processes that went (exit, exec) with pages still to come
        self.watchdog = 0
        self.done_sock: socket.socket | None = None
        self.rootfd = -1
        self.total = sum(m.index.bytes() for m in mms) // PAGE
        self._buf = ctypes.create_string_buffer(U.UFFD_MSG_SIZE * MSGS)
        try:
            self.rootfd = os.pidfd_open(root)
        except OSError:
            pass

    def log(self, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        try:
            os.write(self.logfd, f"{stamp} lcr lazy[{os.getpid()}] root {self.root}: {msg}\n".encode())
        except OSError:
            pass

    # --- watchdog ----------------------------------------------------------------
    def spawn_watchdog(self, close: int = -1) -> None:
        """The watchdog: a child in a process group of its own, on the other
        end of a socket pair; the server sends it a copy of every
        userfaultfd a fork hands over, and "d" (done) or "k" (killed the
        tree) at the end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:                                      # pragma: no cover (child)
            ours.close()
            if close >= 0:
                os.close(close)
            os.setpgid(0, 0)                              # a group of its own
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            code = _watch(theirs, self)
            os._exit(code)
        theirs.close()
        self.watchdog = pid
        self.done_sock = ours

    def watchdog_gone(self) -> None:
        """The watchdog died (killed alone): a new one, forked now, holds every
        userfaultfd the server holds (inherited) -- else the server's death
        would leave the tree running on zero pages."""
        old, self.done_sock = self.done_sock, None
        if old is not None:
            old.close()
        try:
            os.waitpid(self.watchdog, os.WNOHANG)
        except ChildProcessError:
            pass
        was = self.watchdog
        try:
            self.spawn_watchdog()
        except OSError as e:      # the tree is not left without one: killed (run)
            raise RestoreError(f"the watchdog {was} died and no new one could be made "
                               f"({e.strerror})") from None
        self.log(f"the watchdog {was} died: a new one, pid {self.watchdog}")

    def tell_watchdog(self, what: bytes, fds: list[int] = ()) -> None:
        if self.done_sock is None:
            return
        try:
            socket.send_fds(self.done_sock, [what], list(fds))
        except OSError:
            pass

    # --- pages -------------------------------------------------------------------
    def data(self, i: int) -> int:
        """The address (in this process) of record i's pages, read, checked
        and decompressed; the last few records are kept."""
        got = self.cache.get(i)
        if got is None:
            v = self.reader.read_skimmed(self.records[i])
            try:
                holder = (ctypes.c_char * len(v)).from_buffer(v)
            except TypeError:                             # read-only (decompressed bytes)
                holder = (ctypes.c_char * len(v)).from_buffer_copy(v)
            got = (holder, ctypes.addressof(holder))
            self.cache[i] = got
            self.order.append(i)
            if len(self.order) > 8:
                self.cache.pop(self.order.pop(0), None)
        return got[1]

    def fill(self, m: Mm, piece: tuple[int, int, int, int]) -> bool:
        """UFFDIO_COPY one piece; False if the mm is changing (what is left
        of the piece is put back: read the events first)."""
        s, e, r, o = piece
        base = self.data(r) + o
        pos = s
        while pos < e:
            try:
                n = U.copy(m.uffd, pos, base + (pos - s), e - pos)
                self.copied += n // PAGE
                pos += n
            except OSError as ex:
                done = getattr(ex, "copied", 0)
                self.copied += done // PAGE
                pos += done
                if ex.errno == errno.EEXIST:
                    pos += PAGE                           # there already: on with the next
                    continue
                if ex.errno == errno.EAGAIN:
                    if pos < e:
                        m.index.add((pos, e, r, o + (pos - s)))
                    return False
                if ex.errno == errno.ESRCH:
                    self.drop(m, "its process is gone")
                    return True
                break                # ENOENT/EINVAL: no longer a registered area
        return True

    def drop(self, m: Mm, why: str) -> None:
        if why != "done" and len(m.index):
            self.gone += 1
        if m.uffd in self.mms:
            del self.mms[m.uffd]
            os.close(m.uffd)

    def fault(self, m: Mm, addr: int) -> bool:
        self.faults += 1
        addr &= ~(PAGE - 1)
        i = m.index.find(addr)
        if i >= 0:
            return self.fill(m, m.index.pop(i))
        try:
            U.zeropage(m.uffd, addr, PAGE)
            self.zero += 1
        except OSError as ex:
            if ex.errno == errno.EAGAIN:
                return False
            if ex.errno == errno.EEXIST:
                try:
                    U.wake(m.uffd, addr, PAGE)
                except OSError:
                    pass
            elif ex.errno == errno.ESRCH:
                self.drop(m, "its process is gone")
        return True

    # --- events --------------------------------------------------------------------
    def events(self, m: Mm) -> bool:
        """Read and handle every message queued on m; False if a fault had to
        wait (the mm is changing): look again soon."""
        ok = True
        while m.uffd in self.mms:
            try:
                n = os.readv(m.uffd, [memoryview(self._buf).cast("B")])
            except BlockingIOError:
                return ok
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return ok
                self.drop(m, f"read: {e.strerror}")
                return ok
            if n <= 0:
                return ok
            raw = self._buf.raw[:n]
            for k in range(0, n, U.UFFD_MSG_SIZE):
                ev, a, b, c = U.parse_msg(raw[k:k + U.UFFD_MSG_SIZE])
                if ev == U.UFFD_EVENT_PAGEFAULT:
                    if not self.fault(m, b):
                        ok = False
                        self.pending.append((m, b))
                elif ev == U.UFFD_EVENT_FORK:
                    fd = a & 0xFFFFFFFF
                    os.set_blocking(fd, False)
                    self.mms[fd] = Mm(fd, m.index.copy())
                    self.tell_watchdog(b"f", [fd])    # it holds the child's too
                    self.total += m.index.bytes() // PAGE
                    self.forks += 1
                elif ev == U.UFFD_EVENT_REMAP:
                    m.index.move(a, b, c)
                elif ev in (U.UFFD_EVENT_REMOVE, U.UFFD_EVENT_UNMAP):
                    m.index.cut(a, b)
        return ok

    def remaining(self) -> int:
        return sum(len(m.index) for m in self.mms.values())

    # --- the loop ------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.pending: list[tuple[Mm, int]] = []
        self.log(f"serving {self.total} pages of {self.reader.name} to {len(self.mms)} "
                 f"process(es); watchdog pid {self.watchdog}")
        try:
            self._loop()
        except LcrError as e:
            self.log(f"{e}; {e.hint + '; ' if getattr(e, 'hint', None) else ''}killing the "
                     f"restored tree so it does not run on without its memory")
            killed = kill_tree(self.root, self.rootfd)
            self.log(f"killed pids {killed} (SIGKILL)")
            self._release("k")
            return 3
        took = time.monotonic() - self.t0
        if self.gone and not self.mms:
            self.log(f"every restored process is gone (exited or exec'd) before all its pages "
                     f"were in; {self.copied} pages copied; stopping")
            self._release("d")
            return 0
        self.log(f"complete: all pages in, {self.copied} copied, {self.faults} faults "
                 f"({self.zero} zero pages), {self.forks} forks; complete_ms={took * 1000:.1f}")
        self._release("d")
        return 0

    def _release(self, what: str) -> None:
        for m in list(self.mms.values()):
            self.drop(m, "done")
        self.tell_watchdog(what.encode())

    def _loop(self) -> None:
        poller = select.poll()
        for fd in self.mms:
            poller.register(fd, select.POLLIN)
        watched = set(self.mms)
        dog = self.done_sock.fileno() if self.done_sock is not None else -1
        if dog >= 0:
            poller.register(dog, 0)               # POLLHUP: the watchdog died
        stream = list(self.mms.values())
        try:
            pace = float(os.environ.get(PACE_ENV, "0") or 0)
        except ValueError:
            pace = 0.0
        while self.mms and self.remaining():
            faults.point("lazy.serve")
            for fd in set(self.mms) - watched:
                poller.register(fd, select.POLLIN)
            for fd in watched - set(self.mms):
                poller.unregister(fd)
            watched = set(self.mms)
            if self.pending:
                again, self.pending = self.pending, []
                for m, addr in again:
                    if m.uffd in self.mms and not self.fault(m, addr):
                        self.pending.append((m, addr))
            busy = bool(self.pending)
            for fd, _ev in poller.poll(1 if busy else 0):
                if fd == dog:
                    poller.unregister(dog)
                    self.watchdog_gone()
                    dog = self.done_sock.fileno() if self.done_sock is not None else -1
                    if dog >= 0:
                        poller.register(dog, 0)
                    continue
                m = self.mms.get(fd)
                if m is not None:
                    busy |= not self.events(m)
            if busy:
                continue
            # the background stream: the next pieces of one mm
            stream = [m for m in stream if m.uffd in self.mms and len(m.index)] or \
                [m for m in self.mms.values() if len(m.index)]
            if not stream:
                continue
            m = stream[0]
            if pace:
                if poller.poll(int(pace * 1000)):
                    continue                              # a fault came meanwhile
            pieces = m.index.take(STREAM_BYTES)
            for k, piece in enumerate(pieces):
                if m.uffd not in self.mms:
                    break                                 # its process went
                if not self.fill(m, piece):
                    for rest in pieces[k + 1:]:           # the mm is changing: events first
                        m.index.add(rest)
                    break


def _watch(sock: socket.socket, srv: Server) -> int:      # pragma: no cover (child)
    """The watchdog: holds the userfaultfds it is given (so threads waiting
    for a page keep waiting, not running on zero pages, if the server dies)
    until the server says "d" (done); "k" (the server killed the tree) or
    end of file (the server died): SIGKILL the tree."""
    held: list[int] = []
    got = b""
    while True:
        try:
            got, fds, _flags, _addr = socket.recv_fds(sock, 16, 8)
        except InterruptedError:
            continue
        except OSError:
            got = b""
        if got == b"f":
            held += fds
            continue
        break
    if got == b"d":
        return 0
    killed = kill_tree(srv.root, srv.rootfd)
    if got != b"k":
        srv.log(f"the page server died before every page was in: killed the restored tree "
                f"{killed} (SIGKILL) so it does not run on without its memory")
    return 2


__all__ = ["check_source", "lazy_area", "start", "Lazy", "Extents", "Server", "kill_tree"]
