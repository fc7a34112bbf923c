"""Freeze every thread of a process with ptrace (works for root and for an
ordinary user alike; no cgroup freezer needed), and let them all go again."""
from __future__ import annotations

import os
import signal
import time

from linuxcr.errors import NoSuchProcess, TaskGone
from linuxcr.procfs import read_stat
from linuxcr.remote import guardian
from linuxcr.remote.task import ALL_SIGNALS, Tracee
from linuxcr.sys import ptrace


def _sigmask(pid: int, tid: int) -> int:
    """The signal mask of a seized thread; a thread killed meanwhile (SIGKILL
    reaches a traced thread too) is TaskGone, not an OSError."""
    try:
        return ptrace.get_sigmask(tid)
    except ProcessLookupError:
        raise TaskGone(f"pid {pid} exited while lcr held it (thread {tid} is gone)") from None

MAX_ROUNDS = 100


def list_tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise NoSuchProcess(f"pid {pid}: no such process") from None


def _suspend_seccomp(t: Tracee) -> None:
    """Keep a seccomp'd task's filters away from the syscalls we inject
    (root only: CAP_SYS_ADMIN; without it `lcr check` refuses such a task)."""
    if os.geteuid() == 0:
        try:
            t.suspend_seccomp()
        except OSError:
            pass


class Frozen:
    """All threads of ``pid`` seized and stopped; the leader first."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: dict[int, Tracee] = {}
        self.masks: dict[int, int] = {}
        self.was_stopped = False        # in a group-stop before we came: no SIGCONT for it
        self.stop_signal = 0            # ... with this signal (what the image records)
        self.starttime = 0
        self.journal: guardian.Journal | None = None   # guarded: the guardian knows it

    @property
    def leader(self) -> Tracee:
        return self.threads[self.pid]

    def others(self) -> list[Tracee]:
        return [t for tid, t in sorted(self.threads.items()) if tid != self.pid]

    def freeze(self) -> None:
        """Seize until no thread appears that we do not hold (threads being
        created while we work are caught on the next round)."""
        if not self.threads:
            try:
                st = read_stat(self.pid)
                self.was_stopped, self.starttime = st.state == "T", st.starttime
            except (FileNotFoundError, ProcessLookupError):
                raise NoSuchProcess(f"pid {self.pid}: no such process") from None
        for _ in range(MAX_ROUNDS):
            new = [tid for tid in list_tids(self.pid) if tid not in self.threads]
            if not new:
                return
            for tid in new:
                t = Tracee(tid)
                t.tgid = self.pid
                try:
                    t.seize()
                except NoSuchProcess:
                    if tid == self.pid:
                        raise
                    continue          # a thread that just exited
                self.threads[tid] = t
                try:
                    t.stop()
                    if tid == self.pid and t.group_stop:
                        # its event-stop names the group-stop (a stop that
                        # began after we read its state counts too)
                        self.was_stopped, self.stop_signal = True, t.group_stop
                    _suspend_seccomp(t)
                except TaskGone:
                    if tid == self.pid:
                        raise
                    del self.threads[tid]
        raise NoSuchProcess(f"pid {self.pid} keeps creating threads; cannot freeze it")

    def block_signals(self, guard: bool = True) -> None:
        """Before lcr changes anything in the process: hand its state to the
        guardian (remote/guardian.py: it survives lcr and puts the process
        back if lcr dies) and make every thread guarded (Tracee.prime: a
        SIGSTOP kept pending, so a thread lcr leaves behind stops before it
        runs any code of its own).  Injected calls then block every signal
        only while they run; registers and masks are the threads' own
        between any two calls.  ``guard=False``: unguarded (only masks
        recorded; lcr's death leaves the threads as they are)."""
        if not guard:
            for tid, t in self.threads.items():
                self.masks[tid] = _sigmask(self.pid, tid)
                t.own_mask = self.masks[tid]
            return
        if self.journal is not None:
            return
        self.hold(guardian.ensure())          # refuses before anything is changed

    def hold(self, journal: guardian.Journal | None) -> None:
        """Guard every thread, journaling to ``journal`` (a guardian of the
        caller's choosing: a rollback's own, engine/snapshots.py), or to none
        (the guardian itself finishing a rollback: the pending SIGSTOPs alone
        then keep the threads from running if it dies too)."""
        if journal is not None:
            fds = [int(fd) for fd in os.listdir(f"/proc/{self.pid}/fd")]
            journal.process(self.pid, stopped=self.was_stopped, fds=fds, starttime=self.starttime)
            self.journal = journal
        for tid, t in self.threads.items():
            self.masks[tid] = _sigmask(self.pid, tid)
            t.own_mask = self.masks[tid]
            assert t.saved_regs is not None
            if journal is not None:
                journal.thread(self.pid, tid, bytes(t.saved_regs), self.masks[tid])
                t.journal = journal
            t.prime()

    def settle(self) -> None:
        """Guarded threads whose state lcr replaced (a rollback: saved_regs
        and masks now the snapshot's): make that their own state, in the
        threads and in the journal, before they are let go.  Sent to the
        guardian first: a death from here puts back the new state."""
        if self.journal is not None:
            fds = [int(fd) for fd in os.listdir(f"/proc/{self.pid}/fd")]
            self.journal.process(self.pid, stopped=self.was_stopped, fds=fds,
                                 starttime=self.starttime)
        for tid, t in self.threads.items():
            if not (t.primed and t.attached and t.saved_regs is not None):
                continue
            t.saved_regs = t.resume_regs()
            t.own_mask = self.masks.get(tid, t.own_mask)
            if self.journal is not None:
                self.journal.thread(self.pid, tid, bytes(t.saved_regs), t.own_mask)
            t.set_regs(t.saved_regs)
            ptrace.set_sigmask(tid, t.own_mask)

    def unblock_signals(self) -> None:
        """Registers and masks as they were (a guarded thread is so between
        any two calls already)."""
        for tid, t in self.threads.items():
            if t.primed:
                continue
            if t.attached and t.saved_regs is not None:
                t.set_regs(t.saved_regs)
            if tid in self.masks:
                ptrace.set_sigmask(tid, self.masks[tid])

    def thaw(self) -> None:
        """Put every thread back exactly as it was and detach."""
        for tid, t in self.threads.items():
            if not t.attached:
                continue
            if t.primed:
                try:
                    t.release()          # own registers and mask already; SIGSTOP consumed
                except OSError:
                    t.detach()           # it died
                continue
            try:
                if t.saved_regs is not None:
                    t.set_regs(t.resume_regs())
                if tid in self.masks:
                    ptrace.set_sigmask(tid, self.masks[tid])
            except OSError:
                pass  # it died; nothing left to put back
            t.detach()
        self._end()

    def _end(self) -> None:
        if self.journal is not None:
            self.journal.end(self.pid)
            self.journal = None

    def kill(self) -> None:
        self.send_kill()
        self.reap()

    def send_kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._end()                  # gone by design (a SIGKILL cannot be taken back)

    def reap(self) -> None:
        """Consume the death of every thread we trace (the parent reaps).
        The leader's death is reported only after every other thread's.

        All threads are waited for at once (WNOHANG rounds), not one after
        the other: when the last live thread of a pid namespace's init is not
        its leader, it waits in the kernel (zap_pid_ns_processes) until every
        other thread's pid is released, which for a traced thread happens
        only once we have consumed its death: waiting for that last thread
        first would wait forever."""
        pending = {t.pid: t for t in self.others() + [self.leader]}
        delay = 0.0005
        while pending:
            progressed = False
            for tid in list(pending):
                try:
                    # as tracer we see each thread die; the parent reaps
                    r, st = ptrace.wait_nohang(tid)
                    if r == 0:
                        continue
                    progressed = True
                    if not (os.WIFEXITED(st) or os.WIFSIGNALED(st)):
                        continue
                except ChildProcessError:
                    pass
                t = pending.pop(tid)
                t.attached = False
                t.close()
                progressed = True
            if pending and not progressed:
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            elif progressed:
                delay = 0.0005
