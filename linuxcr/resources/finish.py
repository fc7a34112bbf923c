"""One finish order: what a task gets back after its memory, for restart,
the migration destination and rollback alike.

``STEPS`` is the order.  Each step has a restart way and a rollback way;
a rollback way that is a ``Skip`` says why a rollback leaves that state as
it is now (a rollback brings back a live process, which keeps its
identity: credentials, limits, locks...).  Nothing is skipped by omission:
a step with no rollback way must say so, and ``run`` refuses unknown step
names in ``skip``.

A new piece of per-task state: its field in image/schema.py, its dump and
restore code in its resource module, and its line here -- not in the
orchestrators (engine/restore.py, engine/snapshots.py, engine/migrate.py),
which all call ``run``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Union

from linuxcr.errors import LcrError
from linuxcr.image.schema import FileDesc, Task, Thread
from linuxcr.procfs import list_fds, read_status
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import (areaflags, cpu, files, fsroot, guards, locks, memory, posix_timers, procattrs,
                               process, pstree, sched, security, signals, threads)
from linuxcr.sys import ptrace

SS_DISABLE = 2
F_SETFD, F_SETFL = 2, 4
FD_CLOEXEC = 1
SEEK_SET = 0


@dataclass
class Finish:
    """One task to finish: the leader ``t`` (stopped, under ptrace), its saved
    record, scratch in it, and what each way needs."""
    t: Tracee
    arena: Arena
    task: Task
    tramp: int                        # the trampoline (restart) or scratch (rollback): unmapped last
    inherited_sigs: int = 0           # signals the task handles or ignores now (reset if not saved)
    rollback: bool = False
    # restart: lcr's fds (fid -> fd) and the tree's open file descriptions
    ours: dict[int, int] = field(default_factory=dict)
    descs: list[FileDesc] = field(default_factory=list)
    inherited_exe: str = ""
    is_root: bool = False             # the root of the restored tree (its parent is lcr)
    # restart: the threads made (filled by the threads step); rollback: the
    # live threads paired with their saved state, the leader first
    threads: list[tuple[Tracee, Task | Thread]] = field(default_factory=list)
    # rollback: fd -> (st_dev, st_ino) at the snapshot; where final masks go (set at thaw)
    fd_keys: dict[int, tuple[int, int]] = field(default_factory=dict)
    masks: dict[int, int] = field(default_factory=dict)
    cwd_key: tuple[int, int] | None = None    # rollback: (st_dev, st_ino) of the cwd at the snapshot
    warnings: list[str] = field(default_factory=list)

    @property
    def vpid(self) -> int:
        return self.task.vpid or self.task.pid     # the task names itself so in its namespace


@dataclass(frozen=True)
class Skip:
    why: str


Way = Union[Callable[[Finish], None], Skip]


@dataclass(frozen=True)
class Step:
    name: str
    restart: Way
    rollback: Way
    fields: tuple[str, ...] = ()      # the Task fields it gives back (tests check all are)


# --- the steps -------------------------------------------------------------------

def _protect(f: Finish) -> None:
    memory.protect_areas(f.t, f.task.vmas)


def _mm(f: Finish) -> None:
    process.restore_mm(f.t, f.arena, f.task.mm, f.inherited_exe)


def _mm_back(f: Finish) -> None:
    """The kernel's view of the layout (brk, the arguments, environment and
    auxv areas a program may move with PR_SET_MM_MAP, as setproctitle()
    does), only where it changed; the executable link stays."""
    if not process.mm_changed(f.t.pid, f.task.mm, f.t.syscall("brk", 0)):
        return
    try:
        process.restore_mm(f.t, f.arena, f.task.mm, os.readlink(f"/proc/{f.t.pid}/exe"))
    except LcrError as e:
        f.warnings.append(f"program break and argument areas not restored: {e}")


def _files(f: Finish) -> None:
    if f.task.files_with is not None:
        # Its fd table is the one of the earlier task files_with (forked with
        # CLONE_FILES), finished before it: installed there already.  Doing it
        # again would close that table's fds (install closes all it finds).
        return
    files.install(f.t, f.task.files, f.ours)
    f.arena.reset()
    files.after_install(f.t, f.arena, f.task.files, f.descs)


def _guards(f: Finish) -> None:
    guards.restore(f.t, f.task)


def _areas_back(f: Finish) -> None:
    """madvise flags and memory locks of every area (resources/areaflags.py);
    the guard regions came back with the memory (engine/snapshots.py)."""
    f.warnings += areaflags.roll_back(f.t, f.task.vmas, f.task.proc)


def _locks(f: Finish) -> None:
    locks.restore(f.t, f.arena, f.task.locks, f.task.files)


def _locks_back(f: Finish) -> None:
    """After step files (fds as at the snapshot): locks taken since released,
    locks released since taken again (engine/snapshots.py refused the
    rollback if another owner holds one of those now)."""
    f.warnings += locks.roll_back(f.t, f.arena, f.task.locks, f.task.files)


def _fs(f: Finish) -> None:
    fsroot.restore(f.t, f.arena, f.task)


def _fs_back(f: Finish) -> None:
    """The working directory, where it is not the one of the snapshot (the
    root directory is: engine/snapshots.py refuses otherwise)."""
    if f.cwd_key is not None and path_key(f"/proc/{f.t.pid}/cwd") == f.cwd_key:
        return
    try:
        fsroot.roll_back_cwd(f.t, f.arena, f.task)
    except LcrError as e:
        f.warnings.append(str(e))


def _misc(f: Finish) -> None:
    process.restore_misc(f.t, f.arena, f.task)


def _misc_back(f: Finish) -> None:
    """umask, personality, name, robust list and clear_child_tid of the
    leader, as restart sets them (a live process may have changed any
    since); its process group, if it moved to another one of its session."""
    process.restore_misc(f.t, f.arena, f.task)
    why = pstree.roll_back_group(f.t, f.task)
    if why:
        f.warnings.append(why)


def _sigactions(f: Finish) -> None:
    signals.restore_actions(f.t, f.arena, f.task.sigactions, f.inherited_sigs)


def _altstack(f: Finish) -> None:
    signals.restore_altstack(f.t, f.arena, f.task.altstack)


def _itimers(f: Finish) -> None:
    signals.restore_itimers(f.t, f.arena, f.task.itimers)


def _rlimits(f: Finish) -> None:
    f.warnings += process.restore_rlimits(f.t.pid, f.task.rlimits)


def _threads(f: Finish) -> None:
    """Every saved thread made again; they share everything restored so far."""
    for th in f.task.threads:
        f.arena.reset()
        new = threads.create(f.t, f.arena, th, f.tramp)
        f.threads.append((new, th))
        threads.restore_thread(new, f.arena, th)


def _threads_back(f: Finish) -> None:
    """Each live thread's kernel-side state as saved: robust list,
    clear_child_tid, name; the alternate signal stack, disabled too."""
    for live, saved in f.threads:
        f.arena.reset()
        if isinstance(saved, Thread):    # the leader's: step misc
            threads.restore_pointers(live, f.arena, saved)
            f.arena.reset()
        if saved.altstack[1] & SS_DISABLE:
            signals.disable_altstack(live, f.arena)
        else:
            signals.restore_altstack(live, f.arena, saved.altstack)


def _posix_timers(f: Finish) -> None:
    posix_timers.restore(f.t, f.arena, f.task.posix_timers)


def _procattrs(f: Finish) -> None:
    """oom_score_adj, subreaper, THP disable, membarrier, timer slack, mlock."""
    procattrs.restore(f.t, f.task.proc, f.task.vmas)


def _sched_seccomp(f: Finish) -> None:
    """Scheduling of every thread, then its seccomp filters: installed while
    the task still has the privilege to (before the identity); lcr's own
    injected calls run with seccomp suspended (resources/security.py)."""
    for tt, a in [(f.t, f.task.attrs)] + [(new, th.attrs) for new, th in f.threads]:
        f.arena.reset()
        sched.restore(tt, a)
        security.restore_early(tt, f.arena, a)


def _rlimits_back(f: Finish) -> None:
    try:
        f.warnings += process.restore_rlimits(f.t.pid, f.task.rlimits)
    except LcrError as e:
        f.warnings.append(f"pid {f.t.pid}: resource limits not rolled back: {e}")


def _procattrs_back(f: Finish) -> None:
    f.warnings += procattrs.roll_back(f.t, f.task.proc)


def _sched_back(f: Finish) -> None:
    """Scheduling and securebits of every live thread as its saved one's
    (seccomp, no_new_privs, credentials, and securebits that cannot be set
    back, were checked before the rollback began: unchanged)."""
    for live, saved in f.threads:
        try:
            sched.restore(live, saved.attrs)
        except LcrError as e:
            f.warnings.append(f"scheduling not rolled back: {e}")
        try:
            security.roll_back_securebits(live, saved.attrs)
        except LcrError as e:
            f.warnings.append(str(e))


def _late_back(f: Finish) -> None:
    f.warnings += procattrs.roll_back_late(f.t, f.task.proc)


def _creds(f: Finish) -> None:
    process.restore_creds(f.t, f.arena, f.task.creds)


def _pending(f: Finish) -> None:
    # the ids the task has now, in its own namespace: with --any-pid they are
    # not the saved ones (and the saved ones may be another process's)
    vpid = _vtid(f.t.pid)
    signals.queue_pending(f.t, f.arena, f.task.pending, vpid, vpid)
    for new, th in f.threads:
        signals.queue_pending(f.t, f.arena, th.pending, vpid, _vtid(new.pid))


def _vtid(tid: int) -> int:
    return read_status(tid).ns_pid[-1]


def _pending_now(pairs) -> list:
    """What is queued now, in the shape of the saved records."""
    out = []
    for i, (live, _saved) in enumerate(pairs):
        shared = [True] if i == 0 else []
        out.append([(sh, info) for sh in [False] + shared
                    for info in ptrace.peek_siginfo(live.pid, sh)
                    if sh or not signals.ours(info)])       # not our held thread's SIGSTOP
    return out


def _signal_state_back(f: Finish) -> None:
    """setitimer() timers, POSIX timers, and the pending signals of the
    process and of each thread become the snapshot's.  Signals that arrived
    since are taken away (drained inside each thread); the snapshot's are
    queued again with their siginfo."""
    task, t, arena, pairs = f.task, f.t, f.arena, f.threads
    saved_pending = [[(p.shared, p.siginfo) for p in s.pending] for _l, s in pairs]
    refill = _pending_now(pairs) != saved_pending
    if refill:
        for live, _saved in pairs[1:]:      # their own queues first
            arena.reset()
            signals.drain_pending(live, arena)
        arena.reset()
        signals.drain_pending(t, arena)     # its own queue, then the process's
    arena.reset()
    signals.set_itimers(t, arena, task.itimers)
    vtid = {live.pid: _vtid(live.pid) for live, _s in pairs}
    tids = {(s.vtid if s is not task else f.vpid): vtid[live.pid] for live, s in pairs}
    if task.posix_timers or os.path.exists(f"/proc/{t.pid}/timers"):
        arena.reset()
        posix_timers.roll_back(t, arena, list(task.posix_timers), tids)
    if refill:
        vpid = vtid[t.pid]
        for live, saved in pairs:
            arena.reset()
            signals.queue_pending(t, arena, saved.pending, vpid,
                                  vpid if saved is task else vtid[live.pid])


def _thread_creds(f: Finish) -> None:
    """Each made thread's identity and capability sets: setresuid() and
    capset() change only the calling thread."""
    for new, th in f.threads:
        f.arena.reset()
        security.restore_identity(new, f.arena, f.task.creds, th.attrs)


def _late_attrs(f: Finish) -> None:
    """Ambient capabilities, dumpable, parent-death signal: setresuid() resets
    them, so after every change of identity."""
    security.restore_ambient(f.t, f.task.attrs)
    f.warnings += procattrs.restore_late(f.t, f.task.proc, f.is_root)


def _thread_regs(f: Finish) -> None:
    """Each made thread's last step: rseq, FPU, registers, mask."""
    for new, th in f.threads:
        threads.finish_thread(new, th)


def _thread_regs_back(f: Finish) -> None:
    for live, saved in f.threads[1:]:
        cpu.restore_fpu(live, saved.xstate)
        live.saved_regs = cpu.final_regs(saved.regs)
        f.masks[live.pid] = saved.sigmask


def _caps(f: Finish) -> None:
    st = read_status(f.t.pid)
    process.restore_caps(f.t, f.arena, f.task.caps, (st.cap_inh, st.cap_prm, st.cap_eff))


def _rseq(f: Finish) -> None:
    cpu.register_rseq(f.t, f.task.rseq)


def _rseq_back(f: Finish) -> None:
    for live, saved in f.threads:
        cpu.register_rseq(live, list(saved.rseq))


def _trampoline(f: Finish) -> None:
    f.t.syscall("munmap", f.tramp, memory.TRAMPOLINE)     # the last thing the task does for us


def _registers(f: Finish) -> None:
    cpu.restore_fpu(f.t, f.task.xstate)
    f.t.set_regs(cpu.final_regs(f.task.regs))
    ptrace.set_sigmask(f.t.pid, f.task.sigmask)


def _registers_back(f: Finish) -> None:
    """Registers, FPU and mask come back at thaw (remote/freezer.py)."""
    cpu.restore_fpu(f.t, f.task.xstate)
    f.t.saved_regs = cpu.final_regs(f.task.regs)
    f.masks[f.t.pid] = f.task.sigmask


# --- files, rolled back ------------------------------------------------------------

def fd_key(pid: int, fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what fd of pid reaches now; None if it is closed."""
    return path_key(f"/proc/{pid}/fd/{fd}")


def path_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_back(f: Finish) -> None:
    """Offsets back; fds opened since closed; regular files closed since reopened.
    Pipes, sockets and other kinds are left as they are (pipes inside the
    tree get their bytes back later: engine/snapshots.py _refill_pipes)."""
    if f.task.files_with is not None:
        return      # one fd table, rolled back with the earlier task that shares it
    t, arena, pid, keys = f.t, f.arena, f.t.pid, f.fd_keys
    saved = {o.fd: o for o in f.task.files}
    descs = {d.fid: d for d in f.descs}
    for fd in list_fds(pid):
        if fd not in keys:
            t.syscall("close", fd, check=False)
    reopened: dict[int, int] = {}     # fid -> fd number it now lives on
    for fd, key in sorted(keys.items()):
        o = saved.get(fd)
        d = descs.get(o.fid) if o else None
        if fd_key(pid, fd) == key:
            if d is not None and d.kind in ("reg", "dir"):
                t.syscall("lseek", fd, d.pos, SEEK_SET, check=False)
                t.syscall("fcntl", fd, F_SETFL, d.flags & files.STATUS_FLAGS, check=False)
            if o is not None:
                t.syscall("fcntl", fd, F_SETFD, FD_CLOEXEC if o.cloexec else 0, check=False)
            continue
        if d is None or d.kind not in ("reg", "dir", "chr"):
            kind = d.kind if d is not None else "file"
            f.warnings.append(f"fd {fd} ({kind}) was closed or replaced since the snapshot: "
                              "left as it is now (only regular files are reopened)")
            continue
        arena.reset()
        if d.fid in reopened:
            src, temp = reopened[d.fid], False
        else:
            try:
                src = arena.open(d.path, d.flags & files.REOPEN_FLAGS, what=f"fd {fd}")
            except LcrError as e:
                f.warnings.append(f"fd {fd}: {e}")
                continue
            temp = True
            if d.pos:
                t.syscall("lseek", src, d.pos, SEEK_SET, check=False)
        t.syscall("dup3", src, fd, files.O_CLOEXEC if o.cloexec else 0)
        if temp:
            t.syscall("close", src, check=False)
        reopened.setdefault(d.fid, fd)


# --- the order ---------------------------------------------------------------------

KEPT = "a rollback brings back the same live process: "
STEPS: tuple[Step, ...] = (
    Step("protect", _protect, Skip("the rollback's memory path drops the write permission it "
                                   "added (memory.roll_back_all); the fast path adds none")),
    # rollback: every area's madvise flags, locks (procattrs' part) and guards
    Step("guards", _guards, _areas_back, ("guards",)),
    Step("mm", _mm, _mm_back, ("mm",)),
    Step("files", _files, _files_back, ("files",)),
    Step("locks", _locks, _locks_back, ("locks",)),
    Step("fs", _fs, _fs_back, ("cwd", "root", "cwd_deleted")),
    # rollback: the process group too (the session is checked unchanged:
    # engine/snapshots.py _precheck_attrs refuses otherwise)
    Step("misc", _misc, _misc_back, ("umask", "personality", "comm", "robust_list", "tid_address")),
    Step("sigactions", _sigactions, _sigactions, ("sigactions",)),
    Step("altstack", _altstack, Skip("with each thread's own, in step threads"), ("altstack",)),
    Step("itimers", _itimers, Skip("with the pending signals (step pending): set once those "
                                   "that arrived since are drained"), ("itimers",)),
    Step("rlimits", _rlimits, _rlimits_back, ("rlimits",)),
    Step("threads", _threads, _threads_back, ("threads",)),
    Step("posix_timers", _posix_timers, Skip("with the pending signals (step pending)"),
         ("posix_timers",)),
    Step("procattrs", _procattrs, _procattrs_back, ("proc",)),
    # rollback: seccomp filters, no_new_privs, securebits and every credential
    # must be as at the snapshot (engine/snapshots.py _precheck_attrs refuses)
    Step("sched_seccomp", _sched_seccomp, _sched_back, ("attrs",)),
    Step("creds", _creds, Skip(KEPT + "its credentials are checked unchanged before the "
                               "rollback begins (refused otherwise)"), ("creds",)),
    Step("pending", _pending, _signal_state_back, ("pending",)),
    Step("thread_creds", _thread_creds, Skip(KEPT + "its threads keep their credentials")),
    Step("thread_regs", _thread_regs, _thread_regs_back),
    Step("caps", _caps, Skip(KEPT + "its capabilities are left as they are"), ("caps",)),
    Step("late_attrs", _late_attrs, _late_back),
    Step("rseq", _rseq, _rseq_back, ("rseq",)),
    Step("trampoline", _trampoline, _trampoline),
    Step("registers", _registers, _registers_back, ("regs", "xstate", "sigmask")),
)
# Task fields given back before the finish, by whom
BEFORE: dict[str, str] = {
    **dict.fromkeys(("pid", "tid", "ppid", "pgid", "sid", "vpid", "pidns_init"),
                    "the tree: engine/restore.py build_tree, resources/pstree.py"),
    "vmas": "memory: resources/memory.py (map, fill, reconcile)",
    "cow": "the tree: engine/restore.py build_shared (forked from the filled parent)",
    "files_with": "the tree: forked with CLONE_FILES (resources/pstree.py clone_flags)",
    **dict.fromkeys(("starttime", "boot_id"), "identity of the original: checked, not given back"),
    # rollback: a live process keeps the job-control state it has now
    "stopped": "job control: resources/jobstop.py, as lcr lets the restored tree go",
}
NAMES = frozenset(s.name for s in STEPS)
# lcr rollback --memory-only: memory, handlers and per-thread state only
MEMORY_ONLY = frozenset({"files", "locks", "fs", "misc", "pending", "rlimits", "procattrs",
                         "sched_seccomp", "late_attrs"})


def run(f: Finish, *, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every step in order (the rollback way if ``f.rollback``), but those
    named in ``skip``; the warnings."""
    unknown = set(skip) - NAMES
    if unknown:
        raise ValueError(f"no finish step named {sorted(unknown)}")
    for step in STEPS:
        way = step.rollback if f.rollback else step.restart
        if step.name in skip or isinstance(way, Skip):
            continue
        f.arena.reset()
        way(f)
    return f.warnings
