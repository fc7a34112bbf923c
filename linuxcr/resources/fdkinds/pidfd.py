"""pidfds (pidfd_open, clone3/clone with CLONE_PIDFD): a handle on one
process, which polls readable once that process has exited.

Dump: the target from fdinfo ("Pid:"/"NSpid:"): -1 once the process has
exited and been reaped, else its pid as the holder sees it (the entry of
NSpid at the holder's pid-namespace depth).  The target must be a process
of the saved tree (Table.check_refs refuses any other at checkpoint; `lcr
check` refuses a live target outside the holder's session).
Restore, inside each restored task once every task of the tree exists
(after_install; open() only gives a stand-in): for a live (or zombie)
target, pidfd_open(pid, flags); for an exited one, the task forks a child
that exits at once and is reaped, and keeps a pidfd of it -- exactly what a
pidfd of a reaped process is (polls readable, signals give ESRCH).  The
result goes on the saved fd number with its close-on-exec flag.  Each fd gets its own
description (a pidfd has no offset; O_NONBLOCK is carried per fd).

A restart with --any-pid (the tasks do not get their pids back) refuses a
pidfd of a live process: the pid would name another process."""
from __future__ import annotations

import os

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import PidfdState
from linuxcr.procfs import read_fdinfo, read_status
from linuxcr.resources import pstree

PIDFD_NONBLOCK = os.O_NONBLOCK
PIDFD_THREAD = os.O_EXCL
F_GETFD, FD_CLOEXEC, O_CLOEXEC = 1, 1, 0o2000000
SIGCHLD = 17


def _nspid(text: str) -> list[int]:
    return [int(x) for x in text.split()] if text else []


def target(ctx) -> tuple[int, int]:
    """(pid as lcr sees it, pid as the holder sees it); (-1, -1): reaped."""
    ns = _nspid(ctx.info.extra.get("NSpid", ctx.info.extra.get("Pid", "-1")))
    if not ns or ns[0] <= 0:
        return -1, -1
    depth = len(read_status(ctx.pid).ns_pid or (0,)) - 1
    return ns[0], ns[depth] if depth < len(ns) else 0


def _sid(pid: int) -> int:
    return os.getsid(pid)


class Pidfd:
    name = "pidfd"

    def matches(self, ctx) -> bool:
        return ctx.link in ("anon_inode:[pidfd]", "[pidfd]") or ctx.link.startswith("pidfd:")

    def reason(self, ctx) -> str | None:
        host, seen = target(ctx)
        if host < 0:
            return None
        if seen == 0:
            return (f"pidfd of pid {host}, a process outside the holder's pid namespace: "
                    "not supported; close it before the checkpoint")
        if ctx.info.flags & PIDFD_THREAD:
            return f"pidfd of thread {host} (PIDFD_THREAD): not supported yet"
        try:
            outside = _sid(host) != _sid(ctx.pid)
        except OSError:
            outside = False      # exiting now: the checkpoint decides
        if outside:
            return (f"pidfd of pid {host}, which is not part of this process tree (another "
                    "session): only pidfds of processes checkpointed with it are restored; "
                    "checkpoint the common ancestor, or close the pidfd first")
        return None

    def dump(self, ctx) -> PidfdState:
        host, seen = target(ctx)
        return PidfdState(pid=max(seen, -1), host_pid=max(host, -1))

    def open(self, state: PidfdState, flags: int) -> int:
        """A stand-in (an O_PATH of /), replaced inside the task by
        after_install once every task of the tree exists."""
        return os.open("/", os.O_PATH | O_CLOEXEC)

    def after_install(self, t, arena, fd: int, state: PidfdState, table) -> None:
        d = table[fd]
        if state.pid < 0:
            new = _reaped_pidfd(t, arena, d.flags & PIDFD_NONBLOCK)
        else:
            try:
                new = t.syscall("pidfd_open", state.pid, d.flags & PIDFD_NONBLOCK)
            except OSError as e:
                raise RestoreError(f"fd {fd}: cannot open a pidfd of pid {state.pid} again: "
                                   f"{e.strerror}", "was it restarted with --any-pid?") from None
            if not restored(t.pid, new):
                t.syscall("close", new)
                raise RestoreError(f"fd {fd}: pid {state.pid}, which a pidfd points at, is not a "
                                   "restored process (the tasks did not get their pids back)",
                                   "restart without --any-pid")
        cloexec = t.syscall("fcntl", fd, F_GETFD) & FD_CLOEXEC
        t.syscall("dup3", new, fd, O_CLOEXEC if cloexec else 0)
        t.syscall("close", new)


def _reaped_pidfd(t, arena, flags: int) -> int:
    """A pidfd, in the task, of a child of its own that has exited and been
    reaped: made in the task's pid namespace, so that pidfd_send_signal
    answers ESRCH there (a pidfd of a process of an outer namespace gives
    EINVAL).  The SIGCHLD it caused is taken back (the task blocks every
    signal while it is rebuilt, and nothing is queued for it yet)."""
    child = pstree.fork_child(t, arena, None)
    vpid = (read_status(child.pid).ns_pid or (child.pid,))[-1]
    try:
        new = t.syscall("pidfd_open", vpid, flags)
    finally:
        child.exit_now(0)
        t.syscall("wait4", vpid, 0, 0, 0)
    mask = arena.put((1 << (SIGCHLD - 1)).to_bytes(8, "little"))
    zero = arena.put(bytes(16))
    t.syscall("rt_sigtimedwait", mask, 0, zero, 8, check=False)
    return new


def restored(holder: int, fd: int) -> bool:
    """Does pidfd ``fd`` of ``holder`` point at a task this restart made
    (traced by us while the tree is rebuilt, or a zombie child of one)?"""
    host = _nspid(read_fdinfo(holder, fd).extra.get("NSpid", ""))
    if not host or host[0] <= 0:
        return False
    st = read_status(host[0])
    if st.state == "Z":
        st = read_status(st.ppid)
    return st.tracer_pid == os.getpid()


KIND = Pidfd()
