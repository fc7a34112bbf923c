"""The snapshot child (engine/snapshots.py): a fork injected into a frozen
process, stopped for good, that holds the process's pages copy-on-write.

It runs no instruction of the application: it is auto-attached at the
fork (PTRACE_O_TRACEFORK), carries PTRACE_O_EXITKILL, holds no file (one
injected close_range), has a session of its own and the comm
``lcr-snapshot`` (how dump.py and the agent recognise it).

It is also *parked*: every signal blocked and, from its last injected call
on, its registers point at a `syscall` instruction with rax = pause.  Let go
by a dying tracer it would only ever sleep in pause() (SIGKILL ends it,
SIGSTOP/SIGCONT restart the pause).  So a rollback can drop EXITKILL
(``loosen``): if the agent dies then, the child survives for the rollback's
guardian, which finishes the rollback from it (engine/snapshots.py), and
never runs code of the application.  ``own`` gives EXITKILL back.  A child
left untraced by a dead agent and a dead guardian is an orphan: the next
agent kills it (``kill_orphans``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal

from linuxcr.errors import LcrError
from linuxcr.image.stream import PAGE
from linuxcr.procfs import read_smaps
from linuxcr.remote.freezer import Frozen
from linuxcr.remote.task import SYSCALL_INSN, Tracee
from linuxcr.resources import memory
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import NR, clone_args

CLONE_PARENT = 0x8000
PTRACE_SETOPTIONS = 0x4200
WNOHANG, WALL = 1, 0x40000000
PR_SET_NAME = 15
SNAP_COMM = "lcr-snapshot"       # the comm of every snapshot child


def set_options(pid: int, opts: int) -> None:
    ptrace.request(PTRACE_SETOPTIONS, pid, 0, opts)


def fork(fz: Frozen, sibling: bool = True) -> Tracee:
    """The snapshot child: a fork of the frozen leader, stopped for good.

    ``sibling`` (the root of a tree): a sibling of the target (CLONE_PARENT,
    SIGCHLD), outside the tree.  Otherwise -- a process inside the tree,
    whose parent is application code -- a child of the target itself with
    no exit signal: an ordinary wait() never sees it (only __WALL does), so
    the application's own wait()s are unchanged; discard reaps it."""
    t = fz.leader
    base = ptrace.PTRACE_O_TRACESYSGOOD
    # No EXITKILL on the target (lcr dying would kill it): the guarded clone
    # (Tracee.clone) leaves parent and child parked in pause() if we die
    # before the child carries EXITKILL; the guardian kills the child.
    # exit_signal 0 makes it a PTRACE_EVENT_CLONE, not a FORK
    set_options(t.pid, base | ptrace.PTRACE_O_TRACEFORK | ptrace.PTRACE_O_TRACECLONE)
    try:
        with t.scratch() as addr:
            cpid = None
            # A sibling of the target (CLONE_PARENT) whose death its parent is told
            # of, so an ordinary wait() reaps it (clone3 wants exit_signal 0 with
            # CLONE_PARENT: the child gets the target's own exit signal).  A
            # namespace init cannot use CLONE_PARENT: then a child of its own
            # that only wait(__WALL) sees (discard makes it reap that).
            tries = ((CLONE_PARENT, 0), (0, 0)) if sibling else ((0, 0),)
            for flags, sig in tries:
                args = clone_args()
                args.flags, args.exit_signal = flags, sig
                t.write(addr, bytes(args))
                try:
                    cpid = t.clone(addr, ctypes.sizeof(args))
                    span = t.scratch_span or (addr, PAGE)     # the child holds it too
                    break
                except LcrError:
                    # no event: a child made untraced must not live a moment
                    ret = ptrace.get_regs(t.pid).rax
                    if 0 < ret < 1 << 31:
                        os.kill(ret, signal.SIGKILL)
                    raise
                except OSError as e:
                    if e.errno != errno.EINVAL or flags == 0:
                        raise LcrError(f"pid {t.pid}: cannot fork a snapshot: {e.strerror}") from None
    finally:
        set_options(t.pid, base)
    c = Tracee(cpid, exitkill=True)
    c.attached = True
    c.cow_shared = True          # read it without pinning (which would unshare it)
    c.saved_regs = ptrace.get_regs(cpid)
    c.insn = t.insn
    try:
        set_options(cpid, base | ptrace.PTRACE_O_EXITKILL)
        if t.journal is not None:
            t.journal.owned(t.tgid, cpid)              # the kernel kills it with us now
        ptrace.set_sigmask(cpid, (1 << 64) - 1)
        c.syscall("close_range", 0, 0xFFFFFFFF, 0)     # it holds no file at all
        # its own session: a dead child must not keep the target's pid number
        # (as session or group id) taken, or a restart could not reuse it
        c.syscall("setsid", check=False)
        c.write(addr, SNAP_COMM.encode() + b"\0")      # our scratch page came along:
        c.syscall("prctl", PR_SET_NAME, addr, 0, 0, 0, check=False)   # a name that says what it is
        c.syscall("munmap", *span, check=False)
        _park(c)
    except BaseException:
        kill(c)
        raise
    return c


def _park(c: Tracee) -> None:
    """At its last injected call's exit stop: resume into pause() only."""
    assert c.insn is not None
    if c.read(c.insn, 2) != SYSCALL_INSN:
        raise LcrError(f"snapshot process {c.pid}: no syscall instruction at 0x{c.insn:x}")
    regs = ptrace.get_regs(c.pid)
    regs.rip, regs.rax, regs.orig_rax = c.insn, NR["pause"], (1 << 64) - 1
    ptrace.set_regs(c.pid, regs)


def loosen(c: Tracee) -> None:
    """Drop EXITKILL: the agent's death lets the (parked) child live on."""
    set_options(c.pid, ptrace.PTRACE_O_TRACESYSGOOD)


def own(c: Tracee) -> None:
    """EXITKILL again: the child dies with its tracer."""
    set_options(c.pid, ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_EXITKILL)


def adopt(cpid: int, insn: int | None) -> Tracee | None:
    """A parked child let go by a dead agent, seized (with EXITKILL) by the
    caller (the rollback's guardian); None if it is not one any more."""
    if not is_snapshot_child(cpid):
        return None
    c = Tracee(cpid, exitkill=True)
    c.cow_shared = True
    c.insn = insn
    try:
        c.seize()
    except LcrError:
        return None
    return c


def is_snapshot_child(pid: int) -> bool:
    """A live process named lcr-snapshot."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != SNAP_COMM:
                return False
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _tracer(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith("TracerPid:")), 0)
    except (OSError, ValueError):
        return -1


def orphans() -> list[int]:
    """Snapshot children nobody traces: left by an agent (and its guardian)
    that died during a rollback, parked in pause() since.  A held one is
    always traced (by its agent, by lcr making it, or by a guardian)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and is_snapshot_child(int(name)) and _tracer(int(name)) == 0:
            out.append(int(name))
    return out


def kill_orphans() -> list[int]:
    """SIGKILL every orphan (those we may signal); the pids killed."""
    killed = []
    for pid in orphans():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def kill(c: Tracee) -> None:
    """SIGKILL a snapshot child and wait until it is gone (or a zombie of another parent)."""
    try:
        os.kill(c.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        while True:
            st = os.waitpid(c.pid, ptrace.WALL)[1]
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                break
    except ChildProcessError:
        pass
    c.attached = False
    c.close()


def reap_in(parent: int, cpid: int) -> None:
    """Make ``parent`` (a live process) reap its zombie child ``cpid``."""
    fz = Frozen(parent)
    try:
        fz.freeze()
        t = fz.leader
        insn = t.find_syscall_insn(memory.vdso_text(memory.collect(read_smaps(parent))))
        for th in fz.threads.values():
            th.insn = insn
        fz.block_signals()
        t.syscall("wait4", cpid, 0, WNOHANG | WALL, 0, check=False)
        fz.unblock_signals()
    finally:
        fz.thaw()
