"""Scheduling of each thread: policy, priority, nice value, deadline
parameters, CPU affinity, timer slack, I/O priority.

Dump: read from outside (sched_getattr, sched_getaffinity, the timer slack
from /proc/TID/timerslack_ns where lcr has CAP_SYS_NICE, else one injected
prctl(PR_GET_TIMERSLACK) per thread).  Restore: lcr sets policy and affinity
of each new thread from outside and reads them back (a CPU missing here
would silently narrow the mask); the timer slack is injected after the
policy, because a change of policy resets it.  What an ordinary user could
not give back (a lower nice value than RLIMIT_NICE allows, a real-time or
deadline policy, a real-time I/O class) is refused by `lcr check`, not
found out at restart.  The I/O priority (ioprio_get/ioprio_set, from
outside) is given back when it differs from what the new thread inherited
from lcr (`ionice -c3 lcr restart` must not leave the restored program
in the idle I/O class)."""
from __future__ import annotations

import os
import resource

from linuxcr.errors import RestoreError
from linuxcr.procfs import read_status, thread_tids
from linuxcr.remote.task import Tracee
from linuxcr.sys.syscalls import ioprio_get, ioprio_set, sched_attr, sched_getattr, sched_setattr

SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
POLICY_NAMES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH",
                5: "SCHED_IDLE", 6: "SCHED_DEADLINE"}
REAL_TIME = (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE)
SCHED_FLAGS_KEPT = 0x7          # RESET_ON_FORK, RECLAIM, DL_OVERRUN
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
CAP_SYS_NICE = 23
CAP_SYS_ADMIN = 21
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
IOPRIO_CLASS_RT = 1


def ioprio_text(value: int) -> str:
    """As ionice prints it: 'best-effort: prio 4'."""
    cls = IOPRIO_CLASSES.get(value >> IOPRIO_CLASS_SHIFT, str(value >> IOPRIO_CLASS_SHIFT))
    return f"{cls}: prio {value & 0xFF}"


def _mask(cpus: set[int]) -> list[int]:
    words = [0] * ((max(cpus, default=0) >> 6) + 1)
    for c in cpus:
        words[c >> 6] |= 1 << (c & 63)
    return words


def _cpus(words: list[int]) -> set[int]:
    return {i * 64 + b for i, w in enumerate(words) for b in range(64) if w >> b & 1}


def dump(t: Tracee) -> dict:
    """The thread's scheduling, as ThreadAttrs fields; ``t`` frozen."""
    a = sched_getattr(t.pid)
    slack = 0 if a.sched_policy in REAL_TIME else _timerslack(t)
    return dict(policy=a.sched_policy, sched_flags=a.sched_flags & SCHED_FLAGS_KEPT,
                nice=a.sched_nice, priority=a.sched_priority, runtime=a.sched_runtime,
                deadline=a.sched_deadline, period=a.sched_period,
                affinity=_mask(os.sched_getaffinity(t.pid)), timerslack=slack,
                ioprio=ioprio_get(t.pid))


def _timerslack(t: Tracee) -> int:
    """/proc/TID/timerslack_ns (that thread's; reading another task's needs
    CAP_SYS_NICE), else an injected prctl (three ptrace stops)."""
    try:
        with open(f"/proc/{t.pid}/timerslack_ns") as f:
            return int(f.read())
    except (PermissionError, FileNotFoundError, ValueError):
        return t.syscall("prctl", PR_GET_TIMERSLACK, 0, 0, 0, 0)


def _privileged(cap: int = CAP_SYS_NICE) -> bool:
    return bool(read_status(os.getpid()).cap_eff >> cap & 1)


def _io_reason(who: str, tid: int) -> str | None:
    """A real-time I/O class needs CAP_SYS_NICE or CAP_SYS_ADMIN to set."""
    try:
        prio = ioprio_get(tid)
    except ProcessLookupError:
        return None
    if prio >> IOPRIO_CLASS_SHIFT != IOPRIO_CLASS_RT or _privileged(CAP_SYS_ADMIN):
        return None
    return (f"{who} has the real-time I/O priority ({ioprio_text(prio)}): restoring it needs "
            f"CAP_SYS_NICE (checkpoint and restart as root, or first `ionice -c2 -p {tid}`)")


def check(pid: int) -> list[str]:
    """What the caller could not give back (root with CAP_SYS_NICE can all)."""
    if _privileged():
        return []
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        nice_lim = resource.prlimit(pid, resource.RLIMIT_NICE)[0]
        rt_lim = resource.prlimit(pid, resource.RLIMIT_RTPRIO)[0]
    except PermissionError:
        return []          # not ours: the permission check says so already
    inf = resource.RLIM_INFINITY
    out = []
    for tid in thread_tids(pid):
        try:
            a = sched_getattr(tid)
        except ProcessLookupError:
            continue
        who = f"thread {tid}" if tid != pid else f"pid {pid}"
        if a.sched_policy == SCHED_DEADLINE:
            out.append(f"{who} runs under SCHED_DEADLINE: restoring it needs CAP_SYS_NICE "
                       "(checkpoint and restart as root)")
        elif a.sched_policy in REAL_TIME and rt_lim != inf and a.sched_priority > rt_lim:
            out.append(f"{who} runs under {POLICY_NAMES[a.sched_policy]} priority "
                       f"{a.sched_priority}, above its RLIMIT_RTPRIO {rt_lim}: restoring it needs "
                       "CAP_SYS_NICE (checkpoint and restart as root)")
        elif a.sched_nice < mine and nice_lim != inf and 20 - a.sched_nice > nice_lim:
            out.append(f"{who} has nice value {a.sched_nice}, lower than yours ({mine}) and than "
                       "its RLIMIT_NICE allows: restoring it needs CAP_SYS_NICE (checkpoint and "
                       "restart as root)")
        io = _io_reason(who, tid)
        if io:
            out.append(io)
    return out


def restore(t: Tracee, a) -> None:
    """Policy, priority, nice, affinity (from outside), then the timer slack."""
    if a is None:
        return
    attr = sched_attr(sched_policy=a.policy, sched_flags=a.sched_flags, sched_nice=a.nice,
                      sched_priority=a.priority, sched_runtime=a.runtime,
                      sched_deadline=a.deadline, sched_period=a.period)
    name = POLICY_NAMES.get(a.policy, str(a.policy))
    try:
        sched_setattr(t.pid, attr)
    except OSError as e:
        raise RestoreError(f"tid {t.pid}: cannot set its scheduling ({name}, priority "
                           f"{a.priority}, nice {a.nice}): {e.strerror}",
                           "restart as root (CAP_SYS_NICE)") from None
    if a.affinity:
        want = _cpus(a.affinity)
        try:
            os.sched_setaffinity(t.pid, want)
            got = os.sched_getaffinity(t.pid)
        except OSError as e:
            got, why = set(), e.strerror
        else:
            why = f"only CPUs {sorted(got)} are usable here"
        if got != want:
            raise RestoreError(f"tid {t.pid}: cannot restore its CPU affinity {sorted(want)}: {why}",
                               "restart on a machine (or cpuset) with those CPUs")
    if a.timerslack and a.policy not in REAL_TIME:
        t.syscall("prctl", PR_SET_TIMERSLACK, a.timerslack, 0, 0, 0)
    _restore_ioprio(t.pid, a.ioprio)


def of_caller(pid: int) -> dict:
    """Another process's scheduling as the agent's worker takes it for the
    command it runs for that process (agent/worker.py): policy, nice,
    priority, CPUs and I/O priority, read from outside."""
    a = sched_getattr(pid)
    return dict(policy=a.sched_policy, nice=a.sched_nice, priority=a.sched_priority,
                cpus=sorted(os.sched_getaffinity(pid)), ioprio=ioprio_get(pid))


def take(want: dict) -> str:
    """This thread (and the threads it starts) scheduled as ``want``
    (of_caller).  Lowering a priority is allowed, raising one may need
    privilege: what could not be taken, or ""."""
    a = sched_getattr(0)
    try:
        if (a.sched_policy, a.sched_nice, a.sched_priority) != \
                (want["policy"], want["nice"], want["priority"]):
            what = "scheduling"
            sched_setattr(0, sched_attr(sched_policy=want["policy"], sched_nice=want["nice"],
                                        sched_priority=want["priority"]))
        if sorted(os.sched_getaffinity(0)) != want["cpus"]:
            what = "CPU affinity"
            os.sched_setaffinity(0, want["cpus"])
        if ioprio_get(0) != want["ioprio"]:
            what = "I/O priority"
            ioprio_set(0, want["ioprio"])
    except OSError as e:
        return f"{what}: {e.strerror or e}"
    return ""


def _restore_ioprio(tid: int, want: int) -> None:
    """Only when it differs: the new thread inherited lcr's, the default
    unless lcr runs under ionice (an explicit set would also detach it from
    the nice value on kernels that derive one from the other)."""
    if want < 0 or ioprio_get(tid) == want:
        return
    try:
        ioprio_set(tid, want)
    except OSError as e:
        raise RestoreError(f"tid {tid}: cannot restore its I/O priority ({ioprio_text(want)}): "
                           f"{e.strerror}", "restart as root (CAP_SYS_NICE)") from None
