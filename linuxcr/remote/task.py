"""A stopped task seen from outside: seize, stop, run syscalls inside it, read
and write its memory, let it go.

Syscall injection (no parasite code): point rip at any ``0f 05`` bytes mapped
executable in the task (the vDSO has some; at restore, our trampoline page),
set the syscall's registers and resume with PTRACE_SYSCALL twice: the task
stops at syscall entry and at syscall exit, where rax holds the result.  The
task never runs a single instruction of its own in between.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from linuxcr import faults
from linuxcr.errors import Busy, KernelError, NoSuchProcess, PermissionDenied, TaskGone
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import (
    ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, NR,
    IOV_MAX, fd_of, process_vm_readv, process_vm_readv_many, process_vm_writev, process_vm_writev_many,
    process_vm_writev_scatter,
    tgkill, user_regs_struct,
)

SYSCALL_INSN = b"\x0f\x05"
# The code page of a guarded scratch mapping: `syscall`, then a parking loop
# (mov eax, __NR_pause; syscall; jmp back to the mov).  A clone injected here
# returns into pause() -- parent and child alike -- if lcr is gone by then.
PARK_CODE = b"\x0f\x05\xb8\x22\x00\x00\x00\x0f\x05\xeb\xf7"
MAP_FIXED_NOREPLACE = 0x100000
ALL_SIGNALS = (1 << 64) - 1
PAGE = 4096
# The signals whose default action is a group-stop (sig_kernel_stop).
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def _to_signed(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


class Tracee:
    """A task we have seized with PTRACE_SEIZE and hold in a ptrace-stop."""

    def __init__(self, pid: int, *, exitkill: bool = False, traceclone: bool = False) -> None:
        self.pid = pid
        self.exitkill = exitkill
        self.traceclone = traceclone
        self.attached = False
        self.insn: int | None = None          # address of a syscall instruction
        self.saved_regs: user_regs_struct | None = None
        self.own_mask: int | None = None      # live task: its signal mask between our calls
        self.cow_shared = False               # a snapshot child: read without pinning
        self._mem_fd: int | None = None
        self.tgid = pid                       # its process (tgkill)
        # Guarded (a live task lcr has changed): a SIGSTOP is kept pending in
        # it, so that if lcr dies it stops before running any code of its
        # own, and the guardian (remote/guardian.py) puts it back.
        self.primed = False
        self.journal = None                   # guardian.Journal, or None (the guardian itself)
        self.park: int | None = None          # PARK_CODE inside our scratch mapping
        self.scratch_span: tuple[int, int] | None = None
        # A blank (a task lcr made): writable code memory of ours where
        # batch() puts a list of syscalls run in one resume (memory.py sets
        # it to the trampoline's code page; an munmap over it clears it).
        self.batch_at: int | None = None
        # The group-stop signal (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU) the task
        # was in when stopped (its event-stop reports it), 0 if it ran.
        self.group_stop = 0

    # --- attach / stop / detach -------------------------------------------------
    def _options(self) -> int:
        return ptrace.PTRACE_O_TRACESYSGOOD | (ptrace.PTRACE_O_EXITKILL if self.exitkill else 0) \
            | (ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK if self.traceclone else 0)

    def suspend_seccomp(self) -> None:
        """While we hold it, the task's seccomp filters (or strict mode) do not
        judge the syscalls we inject (needs CAP_SYS_ADMIN; ends at detach)."""
        ptrace.set_options(self.pid, self._options() | ptrace.PTRACE_O_SUSPEND_SECCOMP)

    def seize(self) -> None:
        opts = self._options()
        for attempt in range(SEIZE_RETRIES + 1):
            try:
                ptrace.seize(self.pid, opts)
                break
            except OSError as e:
                # A task in the middle of execve() is briefly not dumpable:
                # our own process refuses us for a moment; ask again.
                if e.errno != errno.EPERM or attempt == SEIZE_RETRIES or not _ours(self.pid):
                    self._seize_failed(e)
                time.sleep(0.005)
        self.attached = True

    def _seize_failed(self, e: OSError) -> None:
        if e.errno == errno.ESRCH:
            raise NoSuchProcess(f"pid {self.pid}: no such process") from None
        if e.errno == errno.EPERM:
            raise explain_eperm(self.pid) from None
        raise KernelError(f"pid {self.pid}: ptrace(SEIZE) failed: {e.strerror}") from None

    def stop(self) -> None:
        """Bring the seized task to a ptrace event-stop (it runs no code after)."""
        ptrace.interrupt(self.pid)
        while True:
            status = ptrace.wait_stop(self.pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.attached = False
                raise TaskGone(f"pid {self.pid} exited while being stopped")
            if ptrace.is_event_stop(status):
                break
            # A signal arrived first (signal-delivery-stop): let it be delivered
            # as it would have been; the pending INTERRUPT stops it right after.
            ptrace.cont(self.pid, os.WSTOPSIG(status))
        sig = os.WSTOPSIG(status)
        self.group_stop = sig if sig in STOP_SIGNALS else 0
        self.saved_regs = ptrace.get_regs(self.pid)

    def detach(self) -> None:
        if self.attached:
            try:
                ptrace.detach(self.pid)
            except ProcessLookupError:
                pass
            self.attached = False
        self.close()

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    # --- registers ------------------------------------------------------------
    def regs(self) -> user_regs_struct:
        return ptrace.get_regs(self.pid)

    def set_regs(self, regs: user_regs_struct) -> None:
        ptrace.set_regs(self.pid, regs)

    def resume_regs(self) -> user_regs_struct:
        """The saved registers made safe to resume after we ran code in the task.

        A task stopped inside a syscall holds -ERESTART* in rax; the kernel
        only turns that into a restart on its own signal path, which our
        injections bypassed, so we do what it would have done.
        """
        assert self.saved_regs is not None
        return restartable_regs(self.saved_regs, restart_block_ok=True)

    # --- syscall injection -----------------------------------------------------
    def find_syscall_insn(self, vdso: tuple[int, int] | None) -> int:
        """An address holding 0f 05 in an executable mapping of the task."""
        regs = self.saved_regs
        assert regs is not None
        if _to_signed(regs.orig_rax) >= 0:
            try:
                if self.read(regs.rip - 2, 2) == SYSCALL_INSN:
                    return regs.rip - 2
            except (OSError, KernelError):
                pass   # rip is at the start of a mapping: look elsewhere
        if vdso is not None:
            data = self.read(vdso[0], vdso[1] - vdso[0])
            at = data.find(SYSCALL_INSN)
            if at >= 0:
                return vdso[0] + at
        raise KernelError(f"pid {self.pid}: no syscall instruction found to run code in the task "
                          "(no vDSO mapped and not stopped in a syscall)")

    def _enter(self, name: str, args: tuple[int, ...]) -> None:
        assert self.insn is not None and self.saved_regs is not None
        regs = self.saved_regs.copy()
        regs.rax = NR[name]
        regs.orig_rax = (1 << 64) - 1
        regs.rip = self.insn
        for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, val & 0xFFFFFFFFFFFFFFFF)
        ptrace.set_regs(self.pid, regs)
        self._step(name)             # to the syscall-entry stop

    def _step(self, name: str) -> None:
        for _ in range(8):
            ptrace.resume_syscall(self.pid)
            status = ptrace.wait_stop(self.pid)
            # A task seized in a group-stop traps once more (PTRACE_EVENT_STOP
            # with its stop signal: the seize's trap, then our INTERRUPT's)
            # on its first resume, before it runs anything: resume it again.
            if not ptrace.is_event(status, ptrace.PTRACE_EVENT_STOP):
                break
        if not ptrace.is_syscall_stop(status):
            self._unexpected(status, name)

    def _result(self, name: str, check: bool) -> int:
        ret = _to_signed(ptrace.get_regs(self.pid).rax)
        if check and -4096 < ret < 0:
            raise OSError(-ret, f"{name} in pid {self.pid}: {os.strerror(-ret)}")
        return ret

    def syscall(self, name: str, *args: int, check: bool = True) -> int:
        """Run one system call inside the stopped task; returns its result.

        A guarded live task (primed) runs it by the kill-safe scheme of
        _guarded; a task lcr made itself (restore, snapshot child) directly."""
        if self.primed:
            return self._guarded(name, args, check)
        if name == "munmap" and self.batch_at is not None and len(args) >= 2 \
                and args[0] <= self.batch_at < args[0] + args[1]:
            self.batch_at = None
        own = self.own_mask          # live but unguarded (rollback): mask all for the call
        if own is not None:
            ptrace.set_sigmask(self.pid, ALL_SIGNALS)
        self._enter(name, args)
        self._step(name)             # to the syscall-exit stop
        try:
            return self._result(name, check)
        finally:
            if own is not None:
                ptrace.set_sigmask(self.pid, own)
                if self.saved_regs is not None:
                    ptrace.set_regs(self.pid, self.saved_regs)

    # --- several independent syscalls in one resume (blanks only) ---------------
    #
    # Each injected call costs two ptrace stops (entry, exit): two round trips
    # through the scheduler, which on a loaded machine cost far more than the
    # call.  A blank's trampoline page is ours and writable: the calls are
    # written there as straight-line code (registers set, `syscall`, rax
    # stored to a result slot; a checked call that failed jumps to the end),
    # ended by int3; one PTRACE_CONT runs them all and the SIGTRAP stops the
    # task.  Only for a task lcr made (no live thread: it has no kill-safety
    # to keep; a live one goes call by call), and only for calls that do not
    # need each other's results.  A checked call that fails stops the batch
    # there (the later ones do not run, as call by call) and is raised naming
    # it and its place; unchecked failures are only returned.

    def batch(self, calls: list[tuple[str, tuple[int, ...], bool]]) -> list[int]:
        """Run (name, args, check) calls; their results, in order."""
        if self.batch_at is None or self.primed or self.own_mask is not None or len(calls) < 2:
            return [self.syscall(name, *args, check=check) for name, args, check in calls]
        out: list[int] = []
        for i in range(0, len(calls), BATCH_MAX):
            out += self._batch(calls[i:i + BATCH_MAX], i, len(calls))
        return out

    def _batch(self, calls: list[tuple[str, tuple[int, ...], bool]], first: int = 0,
               total: int = 0) -> list[int]:
        assert self.batch_at is not None and self.saved_regs is not None
        at = self.batch_at
        size = sum(_CALL_SIZE + (_CHECK_SIZE if check else 0) for _n, _a, check in calls) + 1
        res = at + ((size + 7) & ~7)
        end = at + size - 1                      # the int3
        code = bytearray()
        for i, (name, args, check) in enumerate(calls):
            code += _call_code(NR[name], args, res + 8 * i)
            if check:                            # cmp rax, -4095; jae end
                here = at + len(code) + _CHECK_SIZE
                code += b"\x48\x3d\x01\xf0\xff\xff\x0f\x83" + (end - here).to_bytes(4, "little", signed=True)
        code += b"\xcc"
        code += bytes(res - at - len(code)) + _NOT_RUN * len(calls)
        self.write(at, code)
        regs = self.saved_regs.copy()
        regs.rip, regs.orig_rax = at, (1 << 64) - 1
        ptrace.set_regs(self.pid, regs)
        what = "batch of " + ", ".join(dict.fromkeys(name for name, _a, _c in calls))
        ptrace.cont(self.pid, 0)
        status = ptrace.wait_stop(self.pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP and status >> 16 == 0):
            self._unexpected(status, what)
        raw = self.read(res, 8 * len(calls))
        rets = [_to_signed(int.from_bytes(raw[8 * i:8 * i + 8], "little")) for i in range(len(calls))]
        for i, ((name, _args, check), ret) in enumerate(zip(calls, rets)):
            if check and -4096 < ret < 0:
                raise OSError(-ret, f"{name} in pid {self.pid} (call {first + i + 1} of "
                              f"{total or len(calls)} in one batch; the later ones not run): "
                              f"{os.strerror(-ret)}")
        return rets

    # --- kill-safe injection into a live task ---------------------------------
    #
    # Rest state (between calls): the thread's own registers and mask, a
    # SIGSTOP pending.  One call:
    #   1. mask = all (only SIGSTOP/SIGKILL can now be delivered);
    #   2. resume -> signal-delivery-stop for the SIGSTOP (suppressed);
    #   3. there, rip = a syscall insn, rax = pause, orig_rax = -1: dying now
    #      leaves it parked in pause() with every signal blocked;
    #   4. at pause's entry stop: queue a new SIGSTOP, then switch orig_rax
    #      and the arguments to the real call (the kernel runs what the
    #      tracer leaves at the entry stop);
    #   5. at the exit stop: read rax, put back the own registers and mask.
    # Whenever lcr dies, the thread either sleeps in pause (mask all) or meets
    # a pending SIGSTOP on its way back to user mode: no instruction of its
    # own ever runs with our registers or mask.  The guardian fixes it.

    def prime(self) -> None:
        """Enter the guarded state: a SIGSTOP pending (the safety net)."""
        self._sigstop()
        self.primed = True

    def _sigstop(self) -> None:
        try:
            tgkill(self.tgid, self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise TaskGone(f"pid {self.pid} exited while being held") from None

    def _to_sigstop(self, what: str) -> None:
        """Resume to the signal-delivery-stop of our pending SIGSTOP.  Event
        stops on the way (a PTRACE_INTERRUPT or group-stop trap of a task
        seized while group-stopped: the guardian's case) are passed."""
        for _ in range(8):
            ptrace.resume_syscall(self.pid)
            status = ptrace.wait_stop(self.pid)
            if not ptrace.is_event(status, ptrace.PTRACE_EVENT_STOP):
                break
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
                and status >> 16 == 0):
            self._unexpected(status, what)

    def _park(self, name: str, at: int) -> user_regs_struct:
        """Steps 1-3 and the entry stop of the parking pause(); the registers
        to run ``name`` with at that entry stop."""
        assert self.saved_regs is not None
        ptrace.set_sigmask(self.pid, ALL_SIGNALS)
        faults.point("inject.masked")
        self._to_sigstop(name)
        regs = self.saved_regs.copy()
        regs.rip, regs.rax, regs.orig_rax = at, NR["pause"], (1 << 64) - 1
        ptrace.set_regs(self.pid, regs)
        faults.point("inject.parked")
        self._step(name)             # entry stop of pause()
        return regs

    def _real(self, regs: user_regs_struct, name: str, args: tuple[int, ...]) -> None:
        regs.orig_rax = regs.rax = NR[name]
        for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, val & 0xFFFFFFFFFFFFFFFF)
        ptrace.set_regs(self.pid, regs)

    def _rest(self) -> None:
        """Step 5's end: the thread's own registers and mask again."""
        assert self.saved_regs is not None and self.own_mask is not None
        ptrace.set_regs(self.pid, self.saved_regs)
        ptrace.set_sigmask(self.pid, self.own_mask)
        faults.point("inject.rest")

    def _guarded(self, name: str, args: tuple[int, ...], check: bool) -> int:
        assert self.insn is not None
        regs = self._park(name, self.insn)
        self._sigstop()              # first the net, then the real call
        faults.point("inject.entry")
        self._real(regs, name, args)
        self._step(name)             # exit stop
        faults.point("inject.exit")
        ret = _to_signed(ptrace.get_regs(self.pid).rax)
        self._rest()
        if check and -4096 < ret < 0:
            raise OSError(-ret, f"{name} in pid {self.pid}: {os.strerror(-ret)}")
        return ret

    def release(self) -> None:
        """Leave the guarded state and detach: consume the pending SIGSTOP at
        its signal-delivery-stop (registers and mask are the thread's own
        throughout: dying here is harmless), delivering on the way any
        signal of the application that comes first, as the kernel would."""
        if self.journal is not None:
            self.journal.release(self.tgid, self.pid)
        sig = 0
        while True:
            ptrace.cont(self.pid, sig)
            status = ptrace.wait_stop(self.pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.attached = False
                break
            if status >> 16 == 0 and os.WSTOPSIG(status) == signal.SIGSTOP:
                ptrace.detach(self.pid)
                self.attached = False
                break
            sig = 0 if status >> 16 else os.WSTOPSIG(status)
        self.primed = False
        self.close()

    def clone(self, args_addr: int, size: int) -> int:
        """Inject clone3() creating a thread or a process; returns its host
        tid/pid: it is auto-attached (TRACECLONE/TRACEFORK), stopped."""
        if self.primed:
            tid = self._guarded_clone(args_addr, size)
        else:
            self._enter("clone3", (args_addr, size))
            tid = self._clone_event()
            self._step("clone3")
            self._result("clone3", True)
        while True:
            st = ptrace.wait_stop(tid)
            if os.WIFSTOPPED(st):
                return tid

    def _clone_event(self) -> int:
        ptrace.resume_syscall(self.pid)
        status = ptrace.wait_stop(self.pid)
        if not (ptrace.is_event(status, ptrace.PTRACE_EVENT_CLONE)
                or ptrace.is_event(status, ptrace.PTRACE_EVENT_FORK)):
            if ptrace.is_syscall_stop(status):   # it failed: no event
                self._result("clone3", True)
            self._unexpected(status, "clone3")
        return ptrace.get_event_msg(self.pid)

    def _guarded_clone(self, args_addr: int, size: int) -> int:
        """clone3 in a live task: clone refuses to start with a signal pending
        (-ERESTARTNOINTR), so no SIGSTOP can be queued before it; instead it
        runs from our parking code: dying before the fork event leaves the
        task -- and the new child -- in pause() with every signal blocked."""
        if self.park is None:
            raise KernelError(f"pid {self.pid}: clone injected without a guarded scratch mapping")
        regs = self._park("clone3", self.park)
        self._real(regs, "clone3", (args_addr, size))
        faults.point("clone.entry")
        try:
            tid = self._clone_event()
        except OSError:
            self._sigstop()          # failed: at its exit stop, no child
            self._rest()
            raise
        if self.journal is not None:
            self.journal.child(self.tgid, tid)
        faults.point("clone.event")
        self._sigstop()
        self._step("clone3")         # exit stop
        faults.point("clone.exit")
        self._rest()
        faults.point("clone.rest")
        return tid

    def exit_now(self, status: int) -> None:
        """Make the task exit as a process that ended with wait-status ``status``
        (exit code or deadly signal): it stays a zombie for its parent.  A
        signal's action must be the default already (pstree.make_zombies)."""
        sig = status & 0x7F
        if sig:
            ptrace.set_sigmask(self.pid, 0)
            me = self.syscall("gettid")        # our tid as we see it (pid namespace)
            self._enter("tkill", (me, sig))    # only ourselves, not our process group
        else:
            self._enter("exit_group", ((status >> 8) & 0xFF,))
        ptrace.resume_syscall(self.pid)
        while True:
            st = ptrace.wait_stop(self.pid)
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                self.attached = False
                return
            ptrace.resume_syscall(self.pid, os.WSTOPSIG(st) if not ptrace.is_syscall_stop(st) else 0)

    def _unexpected(self, status: int, name: str) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.attached = False
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            raise TaskGone(f"pid {self.pid} died during injected {name}"
                           + (f" (signal {signal.Signals(sig).name})" if sig else ""))
        raise KernelError(f"pid {self.pid}: unexpected stop 0x{status:x} during injected {name}")

    # --- memory ------------------------------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(addr, buf)
        return bytes(buf)

    def readinto(self, addr: int, buf: bytearray | memoryview) -> None:
        """process_vm_readv; falls back to /proc/PID/mem for unreadable pages.

        A snapshot child (cow_shared) is read through /proc/PID/mem only:
        process_vm_readv pins pages, and pinning an anonymous page shared
        copy-on-write makes the kernel copy it (slow, and the snapshot would
        stop sharing memory with the process)."""
        got = 0
        if not self.cow_shared:
            try:
                got = process_vm_readv(self.pid, buf, addr)
            except OSError:
                got = 0
        if got < len(buf):
            mv = memoryview(buf)[got:]
            n = os.preadv(self.mem_fd(), [mv], addr + got)
            if n != len(mv):
                raise KernelError(f"pid {self.pid}: short read of memory at 0x{addr + got:x}")

    def readinto_many(self, pieces: list[tuple[int, int]], buf: memoryview) -> None:
        """Scattered (address, length) pieces into buf, back to back, in one
        process_vm_readv where it can (IOV_MAX pieces at most)."""
        got = 0
        if not self.cow_shared and len(pieces) <= IOV_MAX:
            try:
                got = process_vm_readv_many(self.pid, buf, pieces)
            except OSError:
                got = 0
        if got < sum(n for _, n in pieces):
            off = 0
            for addr, n in pieces:
                self.readinto(addr, buf[off:off + n])
                off += n

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """process_vm_writev; falls back to /proc/PID/mem for read-only pages."""
        try:
            got = process_vm_writev(self.pid, data, addr)
        except OSError:
            got = 0
        if got < len(data):
            mv = memoryview(data)[got:]
            n = os.pwritev(self.mem_fd(), [mv], addr + got)
            if n != len(mv):
                raise KernelError(f"pid {self.pid}: short write of memory at 0x{addr + got:x}")

    def write_many(self, pieces: list[tuple[int, memoryview]]) -> None:
        """Scattered pieces, IOV_MAX at a time; piece by piece where that fails."""
        for i in range(0, len(pieces), IOV_MAX):
            batch = pieces[i:i + IOV_MAX]
            try:
                got = process_vm_writev_many(self.pid, batch)
            except OSError:
                got = 0
            if got < sum(len(d) for _, d in batch):
                for addr, data in batch:
                    self.write(addr, data)

    def write_scatter(self, pieces: list[tuple[int, int]], buf: memoryview) -> None:
        """buf, back to back, into scattered (address, length) pieces: one
        process_vm_writev per IOV_MAX pieces (one local iovec: no per-piece
        buffer objects); piece by piece where that fails."""
        off = 0
        for i in range(0, len(pieces), IOV_MAX):
            batch = pieces[i:i + IOV_MAX]
            size = sum(n for _, n in batch)
            view = buf[off:off + size]
            try:
                got = process_vm_writev_scatter(self.pid, view, batch)
            except OSError:
                got = 0
            if got < size:
                o = 0
                for addr, n in batch:
                    self.write(addr, view[o:o + n])
                    o += n
            off += size

    def mem_fd(self) -> int:
        if self._mem_fd is None:
            with _MEM_FD_LOCK:       # page writers may ask from several threads
                if self._mem_fd is None:
                    try:
                        self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
                    except (FileNotFoundError, ProcessLookupError):
                        raise TaskGone(f"pid {self.pid} exited while lcr worked on it") from None
        return self._mem_fd

    @contextmanager
    def scratch(self, size: int = PAGE) -> Iterator[int]:
        """An anonymous mapping inside the task, removed again afterwards.

        In a guarded task: at an address chosen (and journaled) before it
        exists, so the guardian can remove it whatever instant lcr dies at,
        plus a code page (PARK_CODE, a cookie) for kill-safe clone."""
        if not self.primed:
            addr = self.syscall("mmap", 0, size, 3, 0x22, (1 << 64) - 1, 0)  # RW, PRIVATE|ANON
            span = (addr, size)
        else:
            span = (_free_gap(self.tgid, size + PAGE), size + PAGE)
            cookie = os.urandom(16)
            assert self.insn is not None
            if self.journal is not None:
                self.journal.mapping(self.tgid, span[0], span[1], cookie, self.insn)
            addr = self.syscall("mmap", span[0], span[1], 7, 0x22 | MAP_FIXED_NOREPLACE,
                                (1 << 64) - 1, 0)
            faults.point("inject.mapped")
            code = bytearray(PAGE)
            code[:len(PARK_CODE)] = PARK_CODE
            code[COOKIE_AT:COOKIE_AT + 16] = cookie
            self.write(addr + size, code)
            self.park = addr + size
        self.scratch_span = span
        try:
            yield addr
        finally:
            self.syscall("munmap", span[0], span[1], check=False)
            self.park = self.scratch_span = None
            if self.primed and self.journal is not None:
                self.journal.unmapped(self.tgid, span[0])


COOKIE_AT = 64      # guardian.COOKIE_AT: where in the code page the cookie is

# batch(): one call is `mov rax, nr` and six `mov reg, imm64` (10 bytes each),
# `syscall` (2), `mov [imm64], rax` (10); BATCH_MAX checked ones and their result
# slots fit in the trampoline's code page after its first 16 bytes.
_MOV_IMM = (b"\x48\xb8", b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")
# A checked call adds `cmp rax, -4095; jae <int3>` (12).  Result slots are
# filled with _NOT_RUN before the run (the calls after a failure keep it).
_CALL_SIZE = 7 * 10 + 2 + 10
_CHECK_SIZE = 12
_NOT_RUN = (1 << 63).to_bytes(8, "little")
BATCH_MAX = 38


_MEM_FD_LOCK = threading.Lock()


def _call_code(nr: int, args: tuple[int, ...], result: int) -> bytes:
    vals = (nr, *args, *(0,) * (6 - len(args)))
    code = b"".join(op + (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for op, v in zip(_MOV_IMM, vals))
    return code + SYSCALL_INSN + b"\x48\xa3" + result.to_bytes(8, "little")


def _free_gap(pid: int, size: int) -> int:
    """A free range of ``size`` bytes in a frozen task, away from its
    neighbours (a guard page each side: no merging with their VMAs)."""
    spans = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            a, b = line.split(None, 1)[0].split("-")
            spans.append((int(a, 16), int(b, 16)))
    spans.sort()
    lo = 1 << 32             # above the low 4 GiB (brk, non-PIE programs)
    for a, b in spans:
        if a - lo >= size + 2 * PAGE and lo + PAGE + size <= 0x7FFF_FFFF_0000:
            return lo + PAGE
        lo = max(lo, b)
    raise KernelError(f"pid {pid}: no free address range for a scratch mapping")


def restartable_regs(saved: user_regs_struct, *, restart_block_ok: bool) -> user_regs_struct:
    """Registers that resume an interrupted syscall the way the kernel would.

    -ERESTART_RESTARTBLOCK needs the kernel's restart block; that exists only
    in the original task (restart_block_ok), a restored one gets -EINTR.
    """
    regs = saved.copy()
    if _to_signed(regs.orig_rax) < 0:
        return regs
    rax = _to_signed(regs.rax)
    if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        regs.rax = regs.orig_rax
        regs.rip -= 2
    elif rax == -ERESTART_RESTARTBLOCK:
        if restart_block_ok:
            regs.rax = NR["restart_syscall"]
            regs.rip -= 2
        else:
            regs.rax = (-errno.EINTR) & 0xFFFFFFFFFFFFFFFF
    regs.orig_rax = (1 << 64) - 1
    return regs


SEIZE_RETRIES = 40


def _ours(pid: int) -> bool:
    """Same owner as us and traced by nobody: an EPERM can only be passing."""
    try:
        st = os.stat(f"/proc/{pid}")
        with open(f"/proc/{pid}/status") as f:
            tracer = next((ln.split()[1] for ln in f if ln.startswith("TracerPid:")), "0")
    except OSError:
        return False
    return (st.st_uid == os.geteuid() or os.geteuid() == 0) and tracer == "0"


def explain_eperm(pid: int) -> Exception:
    """Why ptrace said EPERM for ``pid``, as the error to raise."""
    try:
        st = os.stat(f"/proc/{pid}")
    except FileNotFoundError:
        return NoSuchProcess(f"pid {pid}: no such process")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:") and int(line.split()[1]) != 0:
                    return traced_by(pid, int(line.split()[1]))
    except OSError:
        pass
    me = os.geteuid()
    if st.st_uid != me and me != 0:
        return PermissionDenied(f"you may not trace pid {pid}: owned by uid {st.st_uid}",
                                "run lcr as that user or as root")
    return PermissionDenied(f"you may not trace pid {pid}: ptrace was refused",
                            "it may be set-uid, non-dumpable, or protected by a security module")


def traced_by(pid: int, tracer: int) -> Busy:
    """The refusal for ``pid``, held under ptrace by ``tracer`` (gdb, strace...)."""
    try:
        with open(f"/proc/{tracer}/comm") as f:
            name = f" ({f.read().strip()})"
    except OSError:
        name = ""
    return Busy(f"pid {pid} is already traced by pid {tracer}{name}",
                "a debugger or another lcr holds it; detach it or wait for it to finish")


@contextmanager
def taken_fd(t: Tracee, tfd: int) -> Iterator[int]:
    """lcr's own copy (pidfd_getfd) of fd ``tfd`` that the stopped task
    ``t`` has just made with an injected syscall: yields it, and closes it
    again if the block fails.  The task's fd is closed after the block,
    whatever happens (injected close, its result not checked)."""
    ours = -1
    try:
        ours = fd_of(t.pid, tfd)
        yield ours
    except BaseException:
        if ours >= 0:
            os.close(ours)
        raise
    finally:
        t.syscall("close", tfd, check=False)


class Arena:
    """Scratch memory inside a task for syscall arguments (strings, structs).

    Allocation is a bump pointer, reset between unrelated calls.
    """

    def __init__(self, t: Tracee, addr: int, size: int) -> None:
        self.t, self.addr, self.size, self.used = t, addr, size, 0

    def reset(self) -> None:
        self.used = 0

    def put(self, data: bytes) -> int:
        n = (len(data) + 15) & ~15
        if self.used + n > self.size:
            self.reset()
            if n > self.size:
                raise KernelError(f"scratch area too small for {len(data)} bytes")
        at = self.addr + self.used
        self.t.write(at, data)
        self.used += n
        return at

    def reserve(self, n: int) -> None:
        """Make sure the next puts of ``n`` bytes in all do not reset the
        arena midway (a batch of calls reads them all at once)."""
        if self.used + n > self.size:
            self.reset()
        if n > self.size:
            raise KernelError(f"scratch area too small for {n} bytes")

    def alloc(self, n: int) -> int:
        return self.put(bytes(n))

    def cstr(self, s: str) -> int:
        return self.put(os.fsencode(s) + b"\0")

    def open(self, path: str, flags: int, mode: int = 0, *, what: str = "file") -> int:
        """openat() inside the task; errors name the path and what it was for."""
        try:
            return self.t.syscall("openat", -100, self.cstr(path), flags | os.O_CLOEXEC, mode)
        except OSError as e:
            from linuxcr.errors import RestoreError
            raise RestoreError(f"cannot open {path} ({what}): {os.strerror(e.errno)}",
                               "the file must exist at the same path on this machine") from None
