"""Unit tests for linuxcr.procfs.timers (/proc/PID/timers) and
linuxcr.procfs.locks (/proc/locks, fdinfo ``lock:`` lines): real samples,
tricky inputs, a property, live /proc."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linuxcr.procfs import parse_fdinfo, read_fdinfo
from linuxcr.procfs.locks import LockEntry, fdinfo_locks, parse_lock_line, parse_locks, read_locks
from linuxcr.procfs.timers import (SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD, SIGEV_THREAD_ID,
                                   parse_timers, read_timers)

# --------------------------------------------------------------------------
# /proc/PID/timers

TIMERS = """\
ID: 9
signal: 14/0000000000000000
notify: signal/pid.3224
ClockID: 1
ID: 6
signal: 38/0000000000000777
notify: signal/tid.3226
ClockID: 0
ID: 5
signal: 36/00005eed0000cafe
notify: signal/pid.3224
ClockID: 1
ID: 4
signal: 0/0000000000000000
notify: none/pid.3224
ClockID: 7
ID: 2147483647
signal: 64/ffffffffffffffff
notify: thread/pid.1
ClockID: -6
ID: 3
signal: 34/0000000000000001
notify: signal/tid.0
ClockID: 2
"""


def test_timers_sample():
    ts = parse_timers(TIMERS)
    assert [t.id for t in ts] == [9, 6, 5, 4, 2147483647, 3]
    a = ts[2]
    assert (a.signo, a.value, a.notify, a.target, a.clock) == (36, 0x5EED0000CAFE, SIGEV_SIGNAL, 3224, 1)
    assert not a.thread_id
    b = ts[1]
    assert b.notify == SIGEV_SIGNAL | SIGEV_THREAD_ID and b.thread_id and b.target == 3226
    assert ts[3].notify == SIGEV_NONE and ts[3].clock == 7
    big = ts[4]
    assert big.value == (1 << 64) - 1 and big.notify == SIGEV_THREAD and big.clock == -6
    assert ts[5].target == 0 and ts[5].thread_id       # its thread has exited


def test_timers_empty_and_bytes():
    assert parse_timers("") == []
    assert parse_timers(TIMERS.encode()) == parse_timers(TIMERS)


@pytest.mark.parametrize("bad", [
    "signal: 1/00\nID: 1\n",                                   # before any ID
    "ID: 1\nsignal: 1/00\nnotify: signal/pid.1\n",             # no ClockID
    "ID: 1\nsignal: 1/00\nnotify: bogus/pid.1\nClockID: 0\n",
    "ID: 1\nsignal: 1/00\nnotify: signal/xid.1\nClockID: 0\n",
    "ID: x\nsignal: 1/00\nnotify: signal/pid.1\nClockID: 0\n",
    "ID: 1\nsignal: 1/zz\nnotify: signal/pid.1\nClockID: 0\n",
    "ID: 1\nno colon here\n",
])
def test_timers_malformed(bad):
    with pytest.raises(ValueError):
        parse_timers(bad)


@given(st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 64), st.integers(0, 2**64 - 1),
                          st.sampled_from(["signal/pid", "signal/tid", "none/pid", "thread/pid"]),
                          st.integers(0, 4194304), st.integers(-2**31, 2**31 - 1)), max_size=8))
def test_timers_property(rows):
    text = "".join(f"ID: {i}\nsignal: {s}/{v:016x}\nnotify: {n}.{p}\nClockID: {c}\n"
                   for i, s, v, n, p, c in rows)
    got = parse_timers(text)
    assert [(t.id, t.signo, t.value, t.target, t.clock) for t in got] == \
        [(i, s, v, p, c) for i, s, v, _, p, c in rows]
    assert [t.thread_id for t in got] == [n.endswith("tid") for *_, n, _, _ in rows]


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("pad", ctypes.c_int * 11)]


def test_timers_live():
    """A timer we create (raw syscall, SIGEV_NONE) shows in our own file."""
    libc = ctypes.CDLL(None, use_errno=True)
    tid = ctypes.c_int(0)
    ev = _Sigevent(value=0xABCDEF, signo=0, notify=SIGEV_NONE)
    if libc.syscall(222, 1, ctypes.byref(ev), ctypes.byref(tid)) != 0:
        pytest.skip(f"timer_create: {os.strerror(ctypes.get_errno())}")
    try:
        mine = [t for t in read_timers(os.getpid()) if t.id == tid.value]
        assert len(mine) == 1
        t = mine[0]
        assert (t.notify, t.value, t.clock, t.target) == (SIGEV_NONE, 0xABCDEF, 1, os.getpid())
    finally:
        libc.syscall(226, tid.value)
    assert all(t.id != tid.value for t in read_timers(os.getpid()))


# --------------------------------------------------------------------------
# locks

LOCKS = """\
1: LEASE  ACTIVE    READ 4720 fe:00:2147780 0 EOF
2: OFDLCK ADVISORY  WRITE -1 fe:00:2147778 0 4
3: POSIX  ADVISORY  READ 4720 fe:00:2147777 100 EOF
4: POSIX  ADVISORY  WRITE 4720 fe:00:2147777 10 29
5: FLOCK  ADVISORY  WRITE 4720 fe:00:2147776 0 EOF
5: -> FLOCK  ADVISORY  WRITE 4811 fe:00:2147776 0 EOF
6: POSIX  MANDATORY WRITE 17 103:0a:12 0 0
7: DELEG  BREAKING  UNLCK 0 00:2c:99 0 EOF
8: POSIX  *NOINODE* WRITE 12 <none>:0 0 EOF
"""


def test_locks_sample():
    ls = parse_locks(LOCKS)
    assert len(ls) == 9
    lease, ofd, rd, wr, fl, waiter, mand, deleg, noino = ls
    assert (lease.kind, lease.mode, lease.type, lease.pid) == ("LEASE", "ACTIVE", "READ", 4720)
    assert (ofd.kind, ofd.pid, ofd.dev, ofd.ino, ofd.start, ofd.end, ofd.length) == \
        ("OFDLCK", -1, (0xFE, 0), 2147778, 0, 4, 5)
    assert (rd.type, rd.start, rd.end, rd.length) == ("READ", 100, None, 0)
    assert (wr.type, wr.start, wr.end, wr.length) == ("WRITE", 10, 29, 20)
    assert (fl.kind, fl.blocked, waiter.blocked, waiter.pid) == ("FLOCK", False, True, 4811)
    assert mand.mode == "MANDATORY" and mand.dev == (0x103, 0x0A) and mand.length == 1
    assert deleg.kind == "DELEG" and deleg.type == "UNLCK"
    assert noino.dev is None and noino.ino == 0 and noino.mode == "*NOINODE*"


def test_lock_line_with_fdinfo_key():
    e = parse_lock_line("lock:\t1: FLOCK  ADVISORY  WRITE 4720 fe:00:2147776 0 EOF")
    assert e == LockEntry(id=1, kind="FLOCK", mode="ADVISORY", type="WRITE", pid=4720,
                          dev=(0xFE, 0), ino=2147776, start=0, end=None)


def test_fdinfo_locks_sample():
    info = parse_fdinfo("pos:\t0\nflags:\t0100002\nmnt_id:\t27\nino:\t2147777\n"
                        "lock:\t1: POSIX  ADVISORY  WRITE 4720 fe:00:2147777 10 29\n"
                        "lock:\t2: POSIX  ADVISORY  READ 4720 fe:00:2147777 100 EOF\n")
    ls = fdinfo_locks(info)
    assert [(e.type, e.start, e.end) for e in ls] == [("WRITE", 10, 29), ("READ", 100, None)]
    assert fdinfo_locks(parse_fdinfo("pos:\t0\nflags:\t02\n")) == []


@pytest.mark.parametrize("bad", [
    "FLOCK  ADVISORY  WRITE 1 fe:00:1 0 EOF",              # no id
    "1: FLOCK  ADVISORY  WRITE 1 fe:00:1 0",               # a field short
    "1: FLOCK  ADVISORY  WRITE x fe:00:1 0 EOF",
    "1: FLOCK  ADVISORY  WRITE 1 zz:00:1 0 EOF",
    "1: FLOCK  ADVISORY  WRITE 1 fe:00:1 0 EOF extra",
    "x: FLOCK  ADVISORY  WRITE 1 fe:00:1 0 EOF",
])
def test_lock_line_malformed(bad):
    with pytest.raises(ValueError):
        parse_lock_line(bad)


@given(st.integers(1, 10**6), st.sampled_from(["FLOCK", "POSIX", "OFDLCK"]),
       st.sampled_from(["READ", "WRITE"]), st.integers(-1, 4194304), st.integers(0, 4095),
       st.integers(0, 2**20 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**62),
       st.one_of(st.none(), st.integers(0, 2**62)), st.booleans())
def test_lock_line_property(i, kind, typ, pid, maj, mnr, ino, start, end, blocked):
    line = (f"{i}: {'-> ' if blocked else ''}{kind} ADVISORY  {typ} {pid} {maj:02x}:{mnr:02x}:{ino} "
            f"{start} {'EOF' if end is None else end}")
    e = parse_lock_line(line)
    assert (e.id, e.kind, e.type, e.pid, e.dev, e.ino, e.start, e.end, e.blocked) == \
        (i, kind, typ, pid, (maj, mnr), ino, start, end, blocked)


def test_locks_live(tmp_path):
    """Locks we take show in our fdinfo and in /proc/locks, as we took them."""
    a, b, c = (os.open(tmp_path / n, os.O_RDWR | os.O_CREAT, 0o600) for n in ("a", "b", "c"))
    try:
        fcntl.flock(a, fcntl.LOCK_EX)
        fcntl.lockf(b, fcntl.LOCK_EX, 20, 10)                      # bytes 10-29
        fcntl.fcntl(c, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqi4x", fcntl.F_RDLCK, 0, 5, 0, 0))
        me = os.getpid()
        la, lb, lc = (fdinfo_locks(read_fdinfo(me, fd)) for fd in (a, b, c))
        assert [(e.kind, e.type, e.pid, e.start, e.end) for e in la] == [("FLOCK", "WRITE", me, 0, None)]
        assert [(e.kind, e.type, e.pid, e.start, e.end) for e in lb] == [("POSIX", "WRITE", me, 10, 29)]
        assert [(e.kind, e.type, e.pid, e.start, e.end) for e in lc] == [("OFDLCK", "READ", -1, 5, None)]
        st_a = os.fstat(a)
        assert la[0].ino == st_a.st_ino      # (dev: the super block's, not always st_dev)
        everywhere = {(e.kind, e.ino) for e in read_locks()}
        assert {("FLOCK", st_a.st_ino), ("POSIX", os.fstat(b).st_ino),
                ("OFDLCK", os.fstat(c).st_ino)} <= everywhere
    finally:
        for fd in (a, b, c):
            os.close(fd)


def test_parse_limits_sample():
    from linuxcr.procfs.limits import parse_limits
    text = ("Limit                     Soft Limit           Hard Limit           Units     \n"
            "Max cpu time              unlimited            unlimited            seconds   \n"
            "Max file size             unlimited            unlimited            bytes     \n"
            "Max data size             unlimited            unlimited            bytes     \n"
            "Max stack size            8388608              unlimited            bytes     \n")
    assert parse_limits(text, unlimited=-1) == [(-1, -1), (-1, -1), (-1, -1), (8388608, -1)]


def test_read_limits_matches_getrlimit():
    import os
    import resource
    from linuxcr.procfs.limits import read_limits
    got = read_limits(os.getpid(), unlimited=resource.RLIM_INFINITY)
    assert got[resource.RLIMIT_NOFILE] == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert got[resource.RLIMIT_STACK] == resource.getrlimit(resource.RLIMIT_STACK)


def test_epoll_and_inotify_fdinfo_lines():
    from linuxcr.procfs.fdinfo import epoll_watches, inotify_watches, parse_fdinfo
    ep = parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n"
                      "tfd:        5 events:       1c data:                5  pos:0 ino:40e sdev:10\n"
                      "tfd:        7 events:       19 data:               ff  pos:0 ino:29e0 sdev:f\n")
    assert epoll_watches(ep) == [(5, 0x1c, 5), (7, 0x19, 0xff)]
    ino = parse_fdinfo("pos:\t0\nflags:\t00\nmnt_id:\t15\nino:\t1057\n"
                       "inotify wd:1 ino:2a sdev:10 mask:100 ignored_mask:0 fhandle-bytes:8 "
                       "fhandle-type:1 f_handle:2a00000012345678\n")
    (w,) = inotify_watches(ino)
    assert (w["wd"], w["ino"], w["mask"], w["f_handle"]) == ("1", "2a", "100", "2a00000012345678")
