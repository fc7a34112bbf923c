"""epoll: every watch (target fd number, events, data).

An epoll set keys its watches by (open file, fd number) of the task that
added them: fdinfo shows one line per watch, 'tfd: N events: X data: Y
pos: ino: sdev:'.  Readiness is not saved: the kernel polls each target
again when the watch is added back, so level-triggered events come back by
themselves (an edge-triggered one that is still pending is reported once
more: a spurious wake-up at worst).

Dump: kcmp(KCMP_EPOLL_TFD) tells whether the task's fd N is still the very
file the watch is on.  A watch can outlive its fd (the fd closed, or its
number reused for another file, while the watched file stays open through a
dup or in a child): the kernel keeps the watch on (file, N).  Then lcr looks
for the watched file among the fds of the holder and of its descendants
(kcmp again), saves it like any open file (ctx.adopt: the same fid as the
task's fd that holds it) and records its fid with the watch.  A watched
file no fd of those processes holds (only a mapping, a file in flight) is
refused: its description could not be shared with the restored watch.
A one-shot watch that fired and was not re-armed yet shows only its flag
bits (EPOLLONESHOT, EPOLLET...): EPOLL_CTL_ADD cannot make such a watch
(it always adds EPOLLERR|EPOLLHUP), only letting it fire can.  That needs
its target to be ready for something (poll), checked at the checkpoint:
a disabled one-shot watch on a target ready for nothing is refused.

Restore: an empty epoll_create1 in lcr (open); a watch on (file, N) whose
fd N named another file is added by lcr itself once every description is
open (finish_open): lcr puts the file on its own fd number N for the
epoll_ctl and puts back what N held; once the task's fds are in
place, injected into the task (after_install): first each disabled
one-shot watch, added for what its target is ready for and fired with
epoll_wait(timeout 0) while nothing else is in the set, then EPOLL_CTL_ADD
of every other watch; then fdinfo is read back to check the kernel took
every watch as saved (EPOLLWAKEUP is silently dropped without
CAP_BLOCK_SUSPEND)."""
from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections import Counter

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import EpollState, EpollWatch
from linuxcr.procfs import read_fdinfo
from linuxcr.procfs.fdinfo import epoll_watches as watches
from linuxcr.procfs import list_fds
from linuxcr.sys.syscalls import NR, libc, pidfd_getfd, pidfd_open, syscall

EPOLL_CLOEXEC = os.O_CLOEXEC
EPOLL_CTL_ADD = 1
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
PRIVATE_BITS = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET   # the kernel's EP_PRIVATE_BITS
# everything poll() can be asked for (POLLIN PRI OUT RDNORM RDBAND WRNORM WRBAND MSG RDHUP)
POLL_ALL = 0x1 | 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000
POLL_ERR_HUP = 0x8 | 0x10
KCMP_EPOLL_TFD = 7


class _kcmp_epoll_slot(ctypes.Structure):
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def disabled(events: int) -> bool:
    """A one-shot watch that fired and waits for EPOLL_CTL_MOD."""
    return bool(events & EPOLLONESHOT) and not events & ~PRIVATE_BITS


def _ready_now(pid: int, fd: int) -> int:
    """poll() revents of a process's fd, through our own copy (poll consumes nothing)."""
    pfd = pidfd_open(pid)
    try:
        ours = pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)
    try:
        p = select.poll()
        p.register(ours, POLL_ALL)
        return sum(ev for _, ev in p.poll(0))
    finally:
        os.close(ours)


def _same_target(pid: int, epfd: int, tfd: int, toff: int) -> int:
    """0: fd tfd of pid is the file the toff-th watch on tfd watches;
    errno.EBADF: fd tfd is not open; any other value: it is another file."""
    slot = _kcmp_epoll_slot(epfd, tfd, toff)
    try:
        return 0 if syscall(NR["kcmp"], pid, pid, KCMP_EPOLL_TFD, tfd, ctypes.byref(slot)) == 0 else -1
    except OSError as e:
        return e.errno


class Epoll:
    name = "epoll"

    def matches(self, ctx) -> bool:
        return ctx.link == "anon_inode:[eventpoll]"

    def reason(self, ctx) -> str | None:
        try:
            ws = watches(ctx.info)
        except ValueError as e:
            return f"epoll: {e}"
        seen: Counter[int] = Counter()
        for tfd, events, _data in ws:
            toff, seen[tfd] = seen[tfd], seen[tfd] + 1
            r = _same_target(ctx.pid, ctx.fd, tfd, toff)
            if r == errno.ENOENT:
                continue          # the watch went away meanwhile
            if r != 0:
                if _holder(ctx.pid, ctx.fd, tfd, toff) is None:
                    what = "which is closed" if r == errno.EBADF else \
                        "whose number now names another file"
                    return (f"epoll watches fd {tfd}, {what}, and no fd of this process or its "
                            "children holds the watched file (a mapping or a message in flight "
                            "may): not supported; close the epoll set or that file first")
                if disabled(events):
                    return (f"epoll holds a fired one-shot watch of fd {tfd}, whose number no "
                            "longer names the watched file: not supported; re-arm or remove it")
                continue
            if disabled(events) and not _ready_now(ctx.pid, tfd):
                return (f"epoll holds a one-shot watch of fd {tfd} that fired and was not re-armed, "
                        f"and fd {tfd} is ready for nothing now: lcr can only make such a watch "
                        "again by letting it fire (checkpoint once it is re-armed)")
        return None

    def dump(self, ctx) -> EpollState:
        out: list[EpollWatch] = []
        seen: Counter[int] = Counter()
        for tfd, ev, data in watches(ctx.info):
            toff, seen[tfd] = seen[tfd], seen[tfd] + 1
            fid = -1
            if _same_target(ctx.pid, ctx.fd, tfd, toff) != 0:
                fid = _adopt_target(ctx, tfd, toff)
            out.append(EpollWatch(fd=tfd, events=ev, data=data, fid=fid))
        return EpollState(watches=out)

    def finish_open(self, fd: int, state: EpollState, env) -> None:
        """Watches whose fd number names another file: added here, by lcr,
        under that number (the task's own watches come in after_install)."""
        for w in state.watches:
            if w.fid >= 0:
                if w.fid not in env.ours:
                    raise RestoreError(f"epoll watches open file #{w.fid}, which the image lacks")
                _add_as(fd, env.ours[w.fid], w)

    def open(self, state: EpollState, flags: int) -> int:
        fd = libc.epoll_create1(EPOLL_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot create an epoll instance: {os.strerror(e)}")
        os.set_blocking(fd, not flags & os.O_NONBLOCK)
        return fd

    def after_install(self, t, arena, fd: int, state: EpollState, fds) -> None:
        """Add the watches from inside the task: they must name its fds."""
        own = [w for w in state.watches if w.fid < 0]
        if not own or len(watches(read_fdinfo(t.pid, fd))) > len(state.watches) - len(own):
            return   # nothing to add, or done already through another fd of this epoll
        for w in own:
            if w.fd not in fds:
                raise RestoreError(f"epoll (fd {fd}) watches fd {w.fd}, which the image does "
                                   "not open in that process")
        for w in own:       # first, while nothing else can fire
            if disabled(w.events):
                _add_disabled(t, arena, fd, w)
        for w in own:
            if not disabled(w.events):
                _add(t, arena, fd, w, w.events)
        want = Counter((w.fd, w.events, w.data) for w in state.watches)
        got = Counter(watches(read_fdinfo(t.pid, fd)))
        if want != got:
            lost = want - got
            tfd, ev, _ = next(iter(lost)) if lost else (0, 0, 0)
            hint = ("EPOLLWAKEUP needs CAP_BLOCK_SUSPEND" if ev & EPOLLWAKEUP else None)
            raise RestoreError(f"epoll fd {fd}: the watch of fd {tfd} (events 0x{ev:x}) did not "
                               "come back as saved", hint)


def family(pid: int) -> list[int]:
    """pid and its descendants (where a watched file may still be held)."""
    out, queue = [], [pid]
    while queue and len(out) < 4096:
        p = queue.pop(0)
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    queue += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _holder(pid: int, epfd: int, tfd: int, toff: int) -> tuple[int, int] | None:
    """(pid, fd) of a process of the family holding the file the toff-th
    watch on tfd of epoll epfd watches."""
    slot = _kcmp_epoll_slot(epfd, tfd, toff)
    for p in family(pid):
        try:
            fds = list_fds(p)
        except OSError:
            continue
        for fd in fds:
            try:
                if syscall(NR["kcmp"], p, pid, KCMP_EPOLL_TFD, fd, ctypes.byref(slot)) == 0:
                    return p, fd
            except OSError:
                continue
    return None


def _adopt_target(ctx, tfd: int, toff: int) -> int:
    """The fid of the watched file found elsewhere (saved like any open file)."""
    where = _holder(ctx.pid, ctx.fd, tfd, toff)
    if where is None or ctx.adopt is None:
        raise RestoreError(f"fd {ctx.fd}: epoll watches fd {tfd}, whose file is held nowhere "
                           "lcr can find it any more")
    pfd = pidfd_open(where[0])
    try:
        copy = pidfd_getfd(pfd, where[1])
    finally:
        os.close(pfd)
    try:
        return ctx.adopt(copy)
    finally:
        os.close(copy)


def _add_as(epfd: int, target: int, w: EpollWatch) -> None:
    """epoll_ctl(ADD) in lcr of ``target`` under fd number w.fd (the number
    the watch is keyed by), then w.fd gets back what it was."""
    try:
        _juggle(epfd, target, w)
    except OSError as e:
        raise RestoreError(f"cannot add the watch of fd {w.fd} (a file no longer at that "
                           f"number) to an epoll set: {e.strerror}") from None


def _juggle(epfd: int, target: int, w: EpollWatch) -> None:
    saved = None
    epfd = os.dup(epfd)           # (w.fd may be the very number of lcr's epoll fd)
    try:
        saved = os.dup(w.fd)
    except OSError:
        pass                      # w.fd is free in lcr
    placed = False
    try:
        if target != w.fd:
            os.dup2(target, w.fd, inheritable=False)
            placed = True
        ev = struct.pack("<IQ", w.events, w.data)
        if libc.epoll_ctl(epfd, EPOLL_CTL_ADD, w.fd, ev) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        if placed:
            if saved is not None:
                os.dup2(saved, w.fd, inheritable=False)
            else:
                os.close(w.fd)
        if saved is not None:
            os.close(saved)
        os.close(epfd)


def _add(t, arena, epfd: int, w: EpollWatch, events: int) -> None:
    try:
        t.syscall("epoll_ctl", epfd, EPOLL_CTL_ADD, w.fd, arena.put(struct.pack("<IQ", events, w.data)))
    except OSError as e:
        raise RestoreError(f"cannot add fd {w.fd} (events 0x{w.events:x}) to epoll fd {epfd}: "
                           f"{os.strerror(e.errno)}") from None


def _add_disabled(t, arena, epfd: int, w: EpollWatch) -> None:
    """A one-shot watch that already fired: add it for what its target is
    ready for and let it fire once (the set holds only such watches yet)."""
    pfd = arena.put(struct.pack("<ihh", w.fd, POLL_ALL, 0))
    t.syscall("poll", pfd, 1, 0)
    ready = struct.unpack("<ihh", t.read(pfd, 8))[2] & (POLL_ALL | POLL_ERR_HUP)
    if not ready:
        raise RestoreError(f"epoll fd {epfd}: fd {w.fd} is ready for nothing, so its fired "
                           "one-shot watch cannot be made again")
    _add(t, arena, epfd, w, w.events | ready)
    buf = arena.alloc(12 * 4)
    n = t.syscall("epoll_wait", epfd, buf, 4, 0)
    got = [struct.unpack_from("<IQ", t.read(buf, 12 * n), 12 * i) for i in range(n)]
    if n != 1 or got[0][1] != w.data:
        raise RestoreError(f"epoll fd {epfd}: the fired one-shot watch of fd {w.fd} did not "
                           f"fire again as expected ({n} events)")

KIND = Epoll()
