"""Job control across a restart: a process saved in a group-stop (SIGSTOP,
^Z, a background read or write of its terminal) comes back stopped.

Dump: the leader's ptrace event-stop names the group-stop signal
(remote/task.py Tracee.stop -> Frozen.stop_signal -> Task.stopped).  lcr
leaves a stopped process stopped by itself, with no new notification to its
parent: resuming a seized task does not end the group-stop of its process
(SIGNAL_STOP_STOPPED), and the kernel puts a task it detaches back into
that group-stop silently (__ptrace_unlink re-arms JOBCTL_STOP_PENDING
without JOBCTL_STOP_CONSUME: no CLD_STOPPED, no CLD_CONTINUED).

Restart (``arm`` then ``settle``): while every task of the process is still
held, its stop signal is sent to it; the first thread lcr lets go meets it
on its way back to user mode -- before any instruction of its own -- and
the whole process group-stops as the kernel always does, telling its parent
(CLD_STOPPED, waitable with WUNTRACED): the restored parent inside the
tree, or lcr for the root.  `kill -CONT` then resumes it.

A signal other than SIGSTOP stops a process only with its default action,
unblocked, and in a process group that is not orphaned (the kernel drops
SIGTSTP, SIGTTIN and SIGTTOU there): otherwise SIGSTOP is sent instead, and
the restart says so.
"""
from __future__ import annotations

import os
import signal
import time

from linuxcr.image.schema import Task
from linuxcr.procfs import read_stat

SIG_DFL = 0
SETTLE_WAIT = 5.0        # seconds for a released process to reach its group-stop


def choose(pid: int, task: Task) -> tuple[int, str]:
    """The signal that stops restored ``pid`` as ``task`` was stopped, and
    why it is not the saved one ("" if it is)."""
    sig = task.stopped
    if sig == signal.SIGSTOP:
        return sig, ""
    name = signal.Signals(sig).name
    action = next((a for a in task.sigactions if a.sig == sig), None)
    if action is not None and action.handler != SIG_DFL:
        why = f"it handles or ignores {name}"
    elif task.sigmask & (1 << (sig - 1)):
        why = f"it blocks {name}"
    elif _pgrp_orphaned(pid):
        why = f"its process group is orphaned (the kernel drops {name} there)"
    else:
        return sig, ""
    return signal.SIGSTOP, f"pid {task.pid}: restored stopped by SIGSTOP, not {name}: {why}"


def arm(pid: int, task: Task) -> list[str]:
    """While lcr still holds every thread of restored ``pid``: queue the
    signal that puts it back into its group-stop.  The warnings."""
    if not task.stopped:
        return []
    sig, why = choose(pid, task)
    os.kill(pid, sig)
    return [why] if why else []


def settle(pids: list[int]) -> list[str]:
    """After lcr let them go: wait until each of ``pids`` is in its
    group-stop, so that restart returns with them stopped.  The warnings."""
    deadline = time.monotonic() + SETTLE_WAIT
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if not _stopped_or_gone(p)]
        if left:
            time.sleep(0.001)
    return [f"pid {p} was restored stopped, but it is not stopped now (continued by someone?)"
            for p in left]


def _stopped_or_gone(pid: int) -> bool:
    try:
        return all(read_stat(int(t)).state in ("T", "Z", "X") for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return True


def _pgrp_orphaned(pid: int) -> bool:
    """The kernel's will_become_orphaned_pgrp for pid's process group: no
    member has a parent in another group of the same session."""
    try:
        me = read_stat(pid)
    except (OSError, ValueError):
        return True
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = read_stat(int(name))
            if st.pgrp != me.pgrp or st.state in ("Z", "X") or st.ppid <= 1:
                continue
            parent = read_stat(st.ppid)
        except (OSError, ValueError):
            continue
        if parent.pgrp != me.pgrp and parent.session == me.session:
            return False
    return True


__all__ = ["arm", "settle", "choose"]
