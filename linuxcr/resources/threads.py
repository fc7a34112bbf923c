"""Threads: per-thread CPU state, signal mask, private pending signals,
alternate stack, rseq, robust futex list, clear_child_tid, name.

Restore: the rebuilt leader creates each thread with an injected clone3()
carrying the saved tid (set_tid); the new thread is auto-attached
(PTRACE_O_TRACECLONE) and set up before anything runs in it."""
from __future__ import annotations

import ctypes

from linuxcr.image.schema import Thread, ThreadAttrs
from linuxcr.procfs import read_status
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import cpu, process, sched, security, signals
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import clone_args

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM


def thread_comm(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().rstrip("\n")


def dump_attrs(pid: int, t: Tracee) -> ThreadAttrs:
    """Scheduling and security of one frozen thread (the leader's too)."""
    return ThreadAttrs(**sched.dump(t), **security.dump(pid, t))


def dump_thread(pid: int, t: Tracee, arena: Arena, sigmask: int) -> Thread:
    altstack = signals.dump_altstack(t, arena)
    info = process.dump_threadinfo(t, arena)
    state = cpu.dump(t)
    vtid = read_status(t.pid).ns_pid[-1]
    return Thread(tid=t.pid, vtid=vtid, comm=thread_comm(pid, t.pid), sigmask=sigmask,
                  pending=[p for p in signals.dump_pending(t.pid) if not p.shared],
                  altstack=altstack, attrs=dump_attrs(pid, t), **state, **info)


def create(leader: Tracee, arena: Arena, th: Thread, insn: int) -> Tracee:
    """A new thread of the leader with the saved tid, stopped, under our control."""
    args = clone_args()
    args.flags = THREAD_FLAGS
    tid_arr = (ctypes.c_int32 * 1)(th.vtid)
    at = arena.put(bytes(tid_arr))
    args.set_tid, args.set_tid_size = at, 1
    tid = leader.clone(arena.put(bytes(args)), ctypes.sizeof(args))
    t = Tracee(tid, exitkill=True, traceclone=True)
    t.attached = True
    t.saved_regs = ptrace.get_regs(tid)
    t.insn = insn
    t.batch_at = leader.batch_at     # the leader's trampoline: same memory, one runs at a time
    return t


def restore_thread(t: Tracee, arena: Arena, th: Thread) -> None:
    """Per-thread kernel state, injected into the thread itself."""
    restore_pointers(t, arena, th)
    signals.restore_altstack(t, arena, th.altstack)


def restore_pointers(t: Tracee, arena: Arena, th: Thread) -> None:
    """Robust futex list, clear_child_tid and name (restart, and rollback of
    a live thread: it may have changed any of them since)."""
    calls = [("set_robust_list", (th.robust_list[0], th.robust_list[1]), True)] \
        if th.robust_list[0] else []
    calls += [("set_tid_address", (th.tid_address,), True),
              ("prctl", (process.PR_SET_NAME, arena.cstr(th.comm[:15])), True)]
    t.batch(calls)                   # independent: one resume (Tracee.batch)


def finish_thread(t: Tracee, th: Thread) -> None:
    """Last: rseq, FPU, registers, mask (the leader does the same for itself)."""
    cpu.register_rseq(t, th.rseq)
    cpu.restore_fpu(t, th.xstate)
    t.set_regs(cpu.final_regs(th.regs))
    ptrace.set_sigmask(t.pid, th.sigmask)


__all__ = ["dump_thread", "create", "restore_thread", "restore_pointers", "finish_thread",
           "read_status"]
