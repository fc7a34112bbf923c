"""timerfd: clock, settime flags, time left, interval and expirations not
read yet.

Dump: timerfd_gettime on our own copy of the file first.  For a periodic
timer that expired and was not read yet the kernel then moves the timer on
to its next expiry and adds the periods it missed to the tick count: what
the program's own next read (or gettime) does first, so nothing it can
observe changes (poll still says readable, read returns the same count).
After that fdinfo holds it all: clockid, ticks, settime flags, it_value
(time left, relative) and it_interval.  Never read(): that consumes ticks.

A timer that expired while the process was frozen has its expiration in
the saved ticks, and the restored fd is readable at once.  A timer whose
time left is 0 is disarmed (its interval is kept, as timerfd_settime keeps
it, but it does not run).

Restore: timerfd_create in lcr (open), unarmed: the pages of the process
are restored after that, which takes a while.  The timer is armed once
the task's fds are in place (after_install, shortly before the process
runs again), from lcr through its own copy of the file: timerfd_settime
with the time left (an absolute timer: now + time left on its clock, so
TFD_TIMER_ABSTIME and TFD_TIMER_CANCEL_ON_SET stay set), then
ioctl(TFD_IOC_SET_TICKS) for the expirations not read yet.  Time spent
checkpointed does not count.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import struct
import time

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import TimerfdState
from linuxcr.procfs import read_fdinfo
from linuxcr.sys.syscalls import libc, pidfd_getfd, pidfd_open

TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400          # _IOW('T', 0, u64); CONFIG_CHECKPOINT_RESTORE
NS = 1_000_000_000
CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
          8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


def _ts(ns: int) -> _timespec:
    return _timespec(ns // NS, ns % NS)


def _ns(ts: _timespec) -> int:
    return ts.tv_sec * NS + ts.tv_nsec


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _pair_ns(text: str) -> int:
    m = _PAIR.search(text)
    return int(m.group(1)) * NS + int(m.group(2)) if m else 0


def gettime(fd: int) -> tuple[int, int]:
    """(time left, interval) in ns; see the module note on why this is safe."""
    cur = _itimerspec()
    if libc.timerfd_gettime(fd, ctypes.byref(cur)) < 0:
        raise _oserror("timerfd_gettime")
    return _ns(cur.it_value), _ns(cur.it_interval)


def _set_ticks(fd: int, ticks: int) -> None:
    fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", ticks))


def _base_clock(clock: int) -> int:
    """The clock whose time an absolute value of this timer is counted on."""
    return {8: 0, 9: 7}.get(clock, clock)


class Timerfd:
    name = "timerfd"

    def matches(self, ctx) -> bool:
        return ctx.link == "anon_inode:[timerfd]"

    def reason(self, ctx) -> str | None:
        clock = int(ctx.info.extra.get("clockid", "-1"))
        if clock not in CLOCKS:
            return f"timerfd on clock {clock}: unknown clock, cannot be recreated"
        return None

    def dump(self, ctx) -> TimerfdState:
        value, interval = gettime(ctx.grab())      # settles an expired periodic timer
        info = read_fdinfo(ctx.pid, ctx.fd).extra  # ticks as they are now
        return TimerfdState(clock=int(info.get("clockid", "0")),
                            settime_flags=int(info.get("settime flags", "0"), 8),
                            value_ns=value, interval_ns=interval,
                            ticks=int(info.get("ticks", "0")))

    def open(self, state: TimerfdState, flags: int) -> int:
        fd = libc.timerfd_create(state.clock, TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot create a timerfd on {CLOCKS.get(state.clock, state.clock)}: "
                               f"{os.strerror(e)}",
                               "alarm clocks need CAP_WAKE_ALARM" if state.clock in (8, 9) else None)
        os.set_blocking(fd, not flags & os.O_NONBLOCK)
        return fd

    def after_install(self, t, arena, fd: int, state: TimerfdState, fds) -> None:
        """Arm the timer now that the process is about to run again."""
        if not (state.value_ns or state.interval_ns or state.settime_flags or state.ticks):
            return
        if _set(read_fdinfo(t.pid, fd).extra):
            return     # armed already through another fd of this timerfd
        pfd = pidfd_open(t.pid)
        try:
            ours = pidfd_getfd(pfd, fd)
        finally:
            os.close(pfd)
        try:
            _arm(ours, state)
        except OSError as e:
            raise RestoreError(f"cannot arm a timerfd again: {e.strerror}") from None
        finally:
            os.close(ours)


def _set(info: dict[str, str]) -> bool:
    """Has this timerfd been set (or given ticks) since it was made?"""
    return (int(info.get("ticks", "0")) != 0 or int(info.get("settime flags", "0"), 8) != 0
            or _pair_ns(info.get("it_value", "")) != 0 or _pair_ns(info.get("it_interval", "")) != 0)


def _arm(fd: int, state: TimerfdState) -> None:
    value = state.value_ns
    if value or state.interval_ns or state.settime_flags:
        if value and state.settime_flags & TFD_TIMER_ABSTIME:
            value += time.clock_gettime_ns(_base_clock(state.clock))
        new = _itimerspec(_ts(state.interval_ns), _ts(value))
        if libc.timerfd_settime(fd, state.settime_flags, ctypes.byref(new), None) < 0:
            raise _oserror("timerfd_settime")
    if not state.ticks:
        return
    try:
        _set_ticks(fd, state.ticks)
        # A timer due very soon may have expired between settime and the
        # ioctl, which then overwrote its tick: a timer that expired has
        # no time left (it waits for a read to move on), so count it.
        if value and _pair_ns(read_fdinfo(os.getpid(), fd).extra.get("it_value", "")) == 0:
            _set_ticks(fd, state.ticks + 1)
    except OSError as e:
        raise RestoreError(f"cannot set the {state.ticks} pending expirations of a timerfd: "
                           f"{e.strerror}",
                           "TFD_IOC_SET_TICKS needs a kernel with CONFIG_CHECKPOINT_RESTORE") from None


KIND = Timerfd()
