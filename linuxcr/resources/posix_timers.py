"""POSIX timers (timer_create): id, clock, how each notifies (signal number
and sigev_value, process- or thread-directed, or not at all), interval and
time left.

Dump: /proc/PID/timers lists the timers; timer_gettime() and
timer_getoverrun(), injected into the frozen task, give what it does not.
Restore, inside the rebuilt task, once its signal handlers are in place and
its threads exist (SIGEV_THREAD_ID may name a thread): with
prctl(PR_TIMER_CREATE_RESTORE_IDS, ON) (Linux 6.13+) timer_create() takes the
wanted id from its in-out timer id argument, so every timer gets its saved id
back; the prctl is turned off again right after.  Then timer_settime() arms
each with its interval and the time it had left (relative: the time the
process spent checkpointed does not count, TIMER_ABSTIME timers included).

What is not restored: the overrun count.  The kernel has no way to set it; a
restored timer's timer_getoverrun() and si_overrun start again at 0 (the
image keeps the saved value for `lcr show`).  A signal of a timer that was
pending at checkpoint comes back with the other pending signals (signals.py),
with its siginfo (si_timerid, si_value, si_overrun) as it was.
"""
from __future__ import annotations

import errno
import os
import struct

from linuxcr.errors import ImageError, NotCheckpointable, RestoreError
from linuxcr.image.schema import PosixTimer
from linuxcr.procfs import read_status
from linuxcr.procfs.timers import SIGEV_NONE, SIGEV_THREAD_ID, read_timers
from linuxcr.remote.task import Arena, Tracee

PR_TIMER_CREATE_RESTORE_IDS = 77
PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON = 0, 1
_ITIMERSPEC = struct.Struct("<qqqq")      # it_interval {sec, nsec}, it_value {sec, nsec}
_SIGEVENT = struct.Struct("<Qiii44x")     # sigev_value, signo, notify, _tid; 64 bytes
_TIMER_ID = struct.Struct("<i12x")        # timer_t (int), in-out
LINEAR_TRIES = 1 << 16                    # old kernels: ids handed out in order


def dump(t: Tracee, arena: Arena) -> list[PosixTimer]:
    """Every timer of the frozen process (t: its leader)."""
    try:
        found = read_timers(t.pid)
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{t.pid}"):
            raise
        raise NotCheckpointable(t.pid, ["/proc/PID/timers is missing (a kernel without "
                                        "CONFIG_CHECKPOINT_RESTORE): its POSIX timers cannot "
                                        "be listed"]) from None
    if not found:
        return []
    its = arena.alloc(_ITIMERSPEC.size)
    out = []
    for pt in sorted(found, key=lambda p: p.id):
        t.syscall("timer_gettime", pt.id, its)
        isec, insec, vsec, vnsec = _ITIMERSPEC.unpack(t.read(its, _ITIMERSPEC.size))
        overrun = t.syscall("timer_getoverrun", pt.id)
        notify, tid = pt.notify, 0
        if pt.thread_id:
            tid = _vtid(pt.target)
            if not tid:
                # its thread has exited: the kernel can deliver nothing any
                # more; a timer that notifies nobody behaves the same
                notify = SIGEV_NONE
        out.append(PosixTimer(id=pt.id, clock=pt.clock, notify=notify, signo=pt.signo,
                              sigval=pt.value, tid=tid, interval_s=isec, interval_ns=insec,
                              left_s=vsec, left_ns=vnsec, overrun=max(overrun, 0)))
    return out


def _vtid(tid: int) -> int:
    """The tid as the process sees it (its own pid namespace): /proc shows ours."""
    if tid <= 0:
        return 0
    try:
        return read_status(tid).ns_pid[-1]
    except (FileNotFoundError, ProcessLookupError):
        return 0


def restore(t: Tracee, arena: Arena, timers: list[PosixTimer]) -> None:
    """Recreate every timer with its saved id, then arm them."""
    if not timers:
        return
    _validate(timers)
    try:
        t.syscall("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0)
        explicit = True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise RestoreError(f"cannot recreate POSIX timers: prctl(PR_TIMER_CREATE_RESTORE_IDS) "
                               f"failed: {e.strerror}") from None
        explicit = False          # before Linux 6.13
    try:
        for tm in sorted(timers, key=lambda x: x.id):
            _create(t, arena, tm, explicit)
    finally:
        if explicit:
            t.syscall("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_OFF,
                      0, 0, 0, check=False)
    for tm in timers:
        _arm(t, arena, tm)


def _validate(timers: list[PosixTimer]) -> None:
    ids = [tm.id for tm in timers]
    if len(set(ids)) != len(ids):
        raise ImageError("image holds a POSIX timer id twice")
    for tm in timers:
        if tm.notify not in (0, 1, 2, 4) or (tm.notify & SIGEV_THREAD_ID and not tm.tid):
            raise ImageError(f"image holds POSIX timer {tm.id} with an invalid notification")


def _sigevent(tm: PosixTimer) -> bytes:
    return _SIGEVENT.pack(tm.sigval, tm.signo, tm.notify, tm.tid if tm.notify & SIGEV_THREAD_ID else 0)


def _create(t: Tracee, arena: Arena, tm: PosixTimer, explicit: bool) -> None:
    ev = arena.put(_sigevent(tm))
    slot = arena.put(_TIMER_ID.pack(tm.id))
    what = f"POSIX timer {tm.id} (clock {tm.clock}"
    what += f", signal {tm.signo} to thread {tm.tid})" if tm.notify & SIGEV_THREAD_ID else ")"
    try:
        if explicit:
            t.syscall("timer_create", tm.clock, ev, slot)
            got = _TIMER_ID.unpack(t.read(slot, _TIMER_ID.size))[0]
            if got != tm.id:
                raise RestoreError(f"cannot recreate {what}: the kernel gave id {got}")
            return
        # Linux < 6.13 hands ids out in increasing order: create and delete
        # until the wanted one comes up (as CRIU did)
        for _ in range(LINEAR_TRIES):
            t.syscall("timer_create", tm.clock, ev, slot)
            got = _TIMER_ID.unpack(t.read(slot, _TIMER_ID.size))[0]
            if got == tm.id:
                return
            t.syscall("timer_delete", got)
            if got > tm.id:
                break
        raise RestoreError(f"cannot recreate {what} with its id on this kernel",
                           "Linux 6.13 or later restores any timer id")
    except OSError as e:
        hint = "its id is taken" if e.errno == errno.EBUSY else None
        raise RestoreError(f"cannot recreate {what}: {e.strerror}", hint) from None


def _arm(t: Tracee, arena: Arena, tm: PosixTimer) -> None:
    isec, insec, vsec, vnsec = tm.interval_s, tm.interval_ns, tm.left_s, tm.left_ns
    if not (vsec or vnsec):
        if not (isec or insec):
            return            # disarmed (or a one-shot that has fired): leave it so
        vnsec = 1             # periodic and due right now: fire at once, as it would have
    try:
        t.syscall("timer_settime", tm.id, 0, arena.put(_ITIMERSPEC.pack(isec, insec, vsec, vnsec)), 0)
    except OSError as e:
        raise RestoreError(f"cannot arm POSIX timer {tm.id} again: {e.strerror}") from None


# --- rollback of a live process (engine/snapshots.py) --------------------------

def roll_back(t: Tracee, arena: Arena, saved: list[PosixTimer], tids: dict[int, int]) -> dict:
    """The live process's timers become the saved ones: timers made since are
    deleted, timers deleted since are created again with their ids, and every
    saved timer is set to its saved interval and time left (disarmed if it
    was).  A timer whose id lives on with the same clock and notification is
    kept (only re-armed).  ``tids``: saved tid -> the live thread standing
    for it now (SIGEV_THREAD_ID), as the process sees both."""
    saved = [_retarget(tm, tids) for tm in saved]
    want = {tm.id: tm for tm in saved}
    try:
        now = {pt.id: pt for pt in read_timers(t.pid)}
    except FileNotFoundError:
        now = {}
    gone, kept = [], []
    for tid_, pt in now.items():
        tm = want.get(tid_)
        if tm is not None and _same_kind(pt, tm):
            kept.append(tm)
        else:
            gone.append(tid_)
    for i in sorted(gone):
        t.syscall("timer_delete", i, check=False)
    make = [tm for tm in saved if tm.id not in {k.id for k in kept}]
    restore(t, arena, make)         # created with their ids, armed
    for tm in kept:
        _arm_exact(t, arena, tm)
    return dict(deleted=len(gone), created=len(make), rearmed=len(kept))


def _retarget(tm: PosixTimer, tids: dict[int, int]) -> PosixTimer:
    if tm.notify & SIGEV_THREAD_ID and tm.tid in tids and tids[tm.tid] != tm.tid:
        import msgspec
        return msgspec.structs.replace(tm, tid=tids[tm.tid])
    return tm


def _same_kind(pt, tm: PosixTimer) -> bool:
    if (pt.clock, pt.notify, pt.signo) != (tm.clock, tm.notify, tm.signo):
        return False
    if tm.notify != SIGEV_NONE and pt.value != tm.sigval:
        return False
    return not pt.thread_id or _vtid(pt.target) == tm.tid


def _arm_exact(t: Tracee, arena: Arena, tm: PosixTimer) -> None:
    """timer_settime to the saved values, disarming a timer that was disarmed."""
    isec, insec, vsec, vnsec = tm.interval_s, tm.interval_ns, tm.left_s, tm.left_ns
    if not (vsec or vnsec) and (isec or insec):
        vnsec = 1
    t.syscall("timer_settime", tm.id, 0, arena.put(_ITIMERSPEC.pack(isec, insec, vsec, vnsec)), 0)
