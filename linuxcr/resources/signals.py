"""Signals: handlers (with flags, restorer, mask), blocked mask, pending
signals (private and process-wide), alternate signal stack."""
from __future__ import annotations

import os
import signal
import struct

from linuxcr.image.schema import PendingSignal, SigAction
from linuxcr.remote.task import Arena, Tracee
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import NR

SIG_IGN = 1
_KSIGACTION = struct.Struct("<QQQQ")       # handler, flags, restorer, mask
STACK_T = struct.Struct("<QIiQ")           # ss_sp, ss_flags (SS_AUTODISARM is bit 31), pad, ss_size
SS_ONSTACK, SS_DISABLE = 1, 2
UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _sigs(mask: int) -> list[int]:
    return [s for s in range(1, 65) if mask >> (s - 1) & 1 and s not in UNCATCHABLE]


def dump_actions(t: Tracee, arena: Arena, caught: int, ignored: int) -> list[SigAction]:
    """Read the handlers of every non-default signal with rt_sigaction()."""
    out = []
    buf = arena.alloc(_KSIGACTION.size)
    for sig in _sigs(caught | ignored):
        t.syscall("rt_sigaction", sig, 0, buf, 8)
        h, fl, rest, mask = _KSIGACTION.unpack(t.read(buf, _KSIGACTION.size))
        out.append(SigAction(sig=sig, handler=h, flags=fl, restorer=rest, mask=mask))
    return out


def dump_altstack(t: Tracee, arena: Arena) -> list[int]:
    buf = arena.alloc(STACK_T.size)
    t.syscall("sigaltstack", 0, buf)
    sp, flags, _pad, size = STACK_T.unpack(t.read(buf, STACK_T.size))
    return [sp, flags & 0xFFFFFFFF, size]


_ITIMERVAL = struct.Struct("<qqqq")   # it_interval {sec, usec}, it_value {sec, usec}


def dump_itimers(t: Tracee, arena: Arena) -> list[list[int]]:
    """setitimer()/alarm() timers: they deliver signals, so they live here."""
    buf = arena.alloc(_ITIMERVAL.size)
    out = []
    for which in range(3):
        t.syscall("getitimer", which, buf)
        out.append(list(_ITIMERVAL.unpack(t.read(buf, _ITIMERVAL.size))))
    return out


def restore_itimers(t: Tracee, arena: Arena, timers: list[list[int]]) -> None:
    for which, tv in enumerate(timers[:3]):
        if len(tv) != 4:
            continue
        isec, iusec, vsec, vusec = tv
        if not (vsec or vusec) and (isec or iusec):
            # a periodic timer that just fired (its signal pending) reads as 0
            # left; setitimer(0) would disarm it, so it fires again at once
            vusec = 1
        if vsec or vusec:   # armed: same interval, same time left
            t.syscall("setitimer", which, arena.put(_ITIMERVAL.pack(isec, iusec, vsec, vusec)), 0)


def dump_pending(pid: int) -> list[PendingSignal]:
    return [PendingSignal(shared=shared, siginfo=info)
            for shared in (False, True) for info in ptrace.peek_siginfo(pid, shared)
            if shared or not ours(info)]


SI_TKILL = -6


def ours(siginfo: bytes) -> bool:
    """The SIGSTOP lcr keeps pending in a thread it holds (remote/task.py,
    Tracee.prime): sent by us with tgkill; never part of the process."""
    sig, _errno, code, spid = struct.unpack_from("<iii4xi", siginfo)   # union at 16
    # si_pid is 0 when lcr is outside the target's pid namespace (lcr run)
    return sig == signal.SIGSTOP and code == SI_TKILL and spid in (os.getpid(), 0)


def restore_actions(t: Tracee, arena: Arena, actions: list[SigAction], inherited: int) -> None:
    """Install the saved handlers; reset the ones the new task inherited from lcr."""
    saved = {a.sig for a in actions}
    acts = [(sig, _KSIGACTION.pack(0, 0, 0, 0)) for sig in _sigs(inherited) if sig not in saved] + \
        [(a.sig, _KSIGACTION.pack(a.handler, a.flags, a.restorer, a.mask)) for a in actions]
    arena.reserve(len(acts) * ((_KSIGACTION.size + 15) & ~15))   # no reuse before the batch runs
    t.batch([("rt_sigaction", (sig, arena.put(k), 0, 8), True) for sig, k in acts])


def restore_altstack(t: Tracee, arena: Arena, alt: list[int]) -> None:
    sp, flags, size = alt
    if flags & SS_DISABLE:
        return  # the new task starts without one
    t.syscall("sigaltstack", arena.put(STACK_T.pack(sp, flags & ~SS_ONSTACK, 0, size)), 0)


def disable_altstack(t: Tracee, arena: Arena) -> None:
    """No alternate signal stack (a live task may have set one since)."""
    t.syscall("sigaltstack", arena.put(STACK_T.pack(0, SS_DISABLE, 0, 0)), 0, check=False)


def queue_pending(t: Tracee, arena: Arena, pending: list[PendingSignal], pid: int, tid: int) -> None:
    """Queue the saved signals again; the task sends them to itself, which the
    kernel allows for any si_code.  All signals are blocked while we work, so
    they stay pending until the saved mask is set at the end."""
    for p in pending:
        sig = int.from_bytes(p.siginfo[:4], "little", signed=True)
        if not 1 <= sig <= 64:
            continue
        info = arena.put(p.siginfo)
        if p.shared:
            t.syscall("rt_sigqueueinfo", pid, sig, info)
        else:
            t.syscall("rt_tgsigqueueinfo", pid, tid, sig, info)


# --- rollback of a live process (engine/snapshots.py) --------------------------

_TIMESPEC = struct.Struct("<qq")
# x86_64 number; belongs in sys/syscalls.py NR (added here until it is there)
EAGAIN = 11
DRAIN_MAX = 1 << 16


def set_itimers(t: Tracee, arena: Arena, timers: list[list[int]]) -> None:
    """All three setitimer() timers exactly as saved: armed ones armed with
    their interval and time left, the others disarmed (restore_itimers only
    arms: a new task starts with none)."""
    for which in range(3):
        tv = timers[which] if which < len(timers) and len(timers[which]) == 4 else [0, 0, 0, 0]
        isec, iusec, vsec, vusec = tv
        if not (vsec or vusec) and (isec or iusec):
            vusec = 1       # periodic, just fired: armed, due now (see restore_itimers)
        t.syscall("setitimer", which, arena.put(_ITIMERVAL.pack(isec, iusec, vsec, vusec)), 0)


def drain_pending(t: Tracee, arena: Arena) -> int:
    """Dequeue every signal pending for thread ``t`` -- its private queue,
    then the process-wide one -- with rt_sigtimedwait() and a zero timeout,
    injected into it (SIGKILL and SIGSTOP excepted: they cannot be pending
    on a stopped, living task anyway).  Returns how many were taken."""
    every = ((1 << 64) - 1) & ~(1 << (signal.SIGKILL - 1)) & ~(1 << (signal.SIGSTOP - 1))
    sset = arena.put(every.to_bytes(8, "little"))
    zero = arena.put(_TIMESPEC.pack(0, 0))
    for n in range(DRAIN_MAX):
        ret = t.syscall("rt_sigtimedwait", sset, 0, zero, 8, check=False)
        if ret == -EAGAIN:
            return n
        if ret < 0:
            raise OSError(-ret, f"rt_sigtimedwait in pid {t.pid}: cannot take a pending signal")
    raise OSError(EAGAIN, f"pid {t.pid}: signals keep arriving faster than they can be taken")
