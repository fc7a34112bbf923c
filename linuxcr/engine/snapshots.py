"""In-memory checkpoints ("crid" snapshots): take, write back, roll back, discard.

take: freeze the process, collect its Task record as a checkpoint would
(pipes' bytes are read without consuming them), copy the areas fork() does
not share copy-on-write (MAP_SHARED, MADV_DONTFORK `dc`, MADV_WIPEONFORK
`wf`), inject a fork (clone3, CLONE_PARENT, SIGCHLD) into the frozen
process and thaw it.  The fork -- the "snapshot child" -- is auto-attached
by TRACEFORK, stopped, and never resumed: it runs no instruction of the
application.  One injected close_range() leaves it holding no file (a
pipe's reader still sees EOF).  It carries PTRACE_O_EXITKILL: if its tracer
(the agent, or lcr for --low-downtime) dies, the kernel kills it.

writeback: a normal image from the Task record of the snapshot moment, the
pages read from the snapshot child, the non-COW areas from the copy.

rollback: the same live process returns to the snapshot: its address space
is rebuilt by injected munmap/mmap (as restore does), pages copied from the
snapshot child; registers, FPU, signal mask and handlers of every thread;
fd offsets, fds opened since closed, regular files closed since reopened.

The tracer of a snapshot child is the thread that injected the fork: the
agent therefore does all of this itself, from one thread.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import signal
import time
from dataclasses import dataclass, field

import msgspec

from linuxcr.engine import dump
from linuxcr.engine.restore import TRAMPOLINE, _free_gap
from linuxcr.errors import LcrError, NoSuchProcess, NotCheckpointable, RestoreError
from linuxcr.image.schema import ShmObject, Task, Tree, Vma
from linuxcr.image.stream import PAGE, ImageWriter
from linuxcr.pipeline import RING, prefetch
from linuxcr.procfs import list_fds, read_fdinfo, read_maps, read_smaps, read_stat, read_status
from linuxcr.remote.freezer import Frozen
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import cpu, files, memory, process, signals
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import clone_args

CLONE_PARENT = 0x8000
PTRACE_SETOPTIONS = 0x4200
F_SETFD, F_SETFL = 2, 4
FD_CLOEXEC = 1
SEEK_SET = 0
SS_DISABLE = 2


class RollbackRefused(LcrError):
    """The live process cannot be brought back to this snapshot."""
    exit_code = 12


class SnapTable(files.Table):
    """files.Table that records fds it cannot save instead of refusing: a
    snapshot is still good for rollback; writeback refuses with the reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.blockers: list[str] = []
        self.keys: dict[int, tuple[int, int]] = {}     # fd -> (st_dev, st_ino) at snapshot time

    def task_files(self, pid: int) -> list:
        from linuxcr.image.schema import OpenFile
        out = []
        for fd in list_fds(pid):
            try:
                v = files.describe(pid, fd)
            except FileNotFoundError:
                continue
            self.keys[fd] = v.key
            if v.reason:
                self.blockers.append(v.reason)
                continue
            info = read_fdinfo(pid, fd)
            fid = self._same_as(pid, fd, v.key)
            if fid is None:
                fid = self._add(pid, fd, v, info.flags & ~files.O_CLOEXEC, info.pos)
            out.append(OpenFile(fd=fd, fid=fid, cloexec=bool(info.flags & files.O_CLOEXEC)))
        return out


@dataclass
class Snapshot:
    crid: str
    pid: int
    uid: int                      # owner of the process (who may use the crid, with root)
    starttime: int
    taken: float                  # time.time()
    frozen_seconds: float
    seconds: float
    task: Task
    table: SnapTable
    shm: list[ShmObject]
    child: Tracee                 # the stopped fork holding the COW pages
    copies: list[tuple[int, bytearray]] = field(default_factory=list)   # non-COW areas
    mapped: list = field(default_factory=list)   # memfd/unlinked objects only mapped
    tracer_tid: int = 0
    extra: dict = field(default_factory=dict)   # the agent's bookkeeping

    def alive(self) -> bool:
        try:
            return read_stat(self.child.pid).state not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False

    def copied_bytes(self) -> int:
        return sum(len(b) for _, b in self.copies)

    def held(self) -> int:
        """Private pages the snapshot child holds (they differ from the live
        process now, or it is gone) plus the copy of the non-COW areas."""
        return _private_dirty(self.child.pid) + self.copied_bytes()

    def info(self) -> dict:
        return dict(crid=self.crid, pid=self.pid, uid=self.uid, time=self.taken,
                    frozen_seconds=round(self.frozen_seconds, 6), seconds=round(self.seconds, 6),
                    held=self.held(), child=self.child.pid, threads=1 + len(self.task.threads),
                    writeback_ok=not self.table.blockers, blockers=list(self.table.blockers))


def _private_dirty(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _special(v: Vma) -> bool:
    """An area fork() does not give the child as a copy-on-write copy."""
    return v.pages and (v.shared or "dc" in v.vmflags or "wf" in v.vmflags)


def _set_options(pid: int, opts: int) -> None:
    ptrace._ptrace(PTRACE_SETOPTIONS, pid, 0, opts)


# --- take -------------------------------------------------------------------

def take(pid: int, *, crid: str | None = None) -> Snapshot:
    """Snapshot process ``pid`` (all its threads); it runs on afterwards."""
    t0 = time.monotonic()
    if pid == os.getpid():
        raise NotCheckpointable(pid, ["lcr cannot snapshot itself"])
    reasons = [r for r in dump.check_process(pid) if not r.startswith("fd ")]
    if reasons:
        raise NotCheckpointable(pid, reasons)
    owner = os.stat(f"/proc/{pid}").st_uid
    fz = Frozen(pid)
    frozen_at = time.monotonic()
    try:
        fz.freeze()
        smaps = read_smaps(pid)
        reasons = memory.check(smaps)
        if reasons:
            raise NotCheckpointable(pid, reasons)
        table = SnapTable()
        task = dump._collect(fz, smaps, table)
        shm, vmas = memory.shm_objects([task.vmas])
        task = msgspec.structs.replace(task, vmas=vmas[0])
        mapped = memory.mapped_objects(pid, [(pid, task.vmas)], table.descs)
        copies = _copy_special(fz.leader, task.vmas)
        child = _fork(fz)
    except BaseException:
        fz.thaw()
        raise
    fz.thaw()
    frozen = time.monotonic() - frozen_at
    return Snapshot(crid=crid or secrets.token_hex(5), pid=pid, uid=owner,
                    starttime=task.starttime, taken=time.time(), frozen_seconds=frozen,
                    seconds=time.monotonic() - t0, task=task, table=table, shm=shm,
                    child=child, copies=copies, mapped=mapped, tracer_tid=_gettid())


def _gettid() -> int:
    return ctypes.CDLL(None).syscall(186)


def _copy_special(t: Tracee, vmas: list[Vma]) -> list[tuple[int, bytearray]]:
    out = []
    for v in vmas:
        if _special(v):
            for addr, n in memory.page_runs(t.pid, [v]):
                buf = bytearray(n * PAGE)
                t.readinto(addr, buf)
                out.append((addr, buf))
    return out


def _fork(fz: Frozen) -> Tracee:
    """The snapshot child: a fork of the frozen leader, stopped for good."""
    t = fz.leader
    base = ptrace.PTRACE_O_TRACESYSGOOD
    # EXITKILL is inherited by the auto-attached child: it can never run on
    # its own, even if we died right after the fork.  (The target carries it
    # only for this one injected call.)
    # exit_signal 0 makes it a PTRACE_EVENT_CLONE, not a FORK
    _set_options(t.pid, base | ptrace.PTRACE_O_TRACEFORK | ptrace.PTRACE_O_TRACECLONE
                 | ptrace.PTRACE_O_EXITKILL)
    try:
        with t.scratch() as addr:
            cpid = None
            # A sibling of the target (CLONE_PARENT) whose death its parent is told
            # of, so an ordinary wait() reaps it.  A namespace init cannot use
            # CLONE_PARENT: then a child of its own that only wait(__WALL) sees.
            for flags, sig in ((CLONE_PARENT, signal.SIGCHLD), (0, 0)):
                args = clone_args()
                args.flags, args.exit_signal = flags, sig
                t.write(addr, bytes(args))
                try:
                    cpid = t.clone(addr, ctypes.sizeof(args))
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
        _set_options(t.pid, base)
    c = Tracee(cpid, exitkill=True)
    c.attached = True
    c.cow_shared = True          # read it without pinning (which would unshare it)
    c.saved_regs = ptrace.get_regs(cpid)
    c.insn = t.insn
    try:
        _set_options(cpid, base | ptrace.PTRACE_O_EXITKILL)
        ptrace.set_sigmask(cpid, (1 << 64) - 1)
        c.syscall("close_range", 0, 0xFFFFFFFF, 0)     # it holds no file at all
        # its own session: a dead child must not keep the target's pid number
        # (as session or group id) taken, or a restart could not reuse it
        c.syscall("setsid", check=False)
        c.syscall("munmap", addr, PAGE, check=False)   # our scratch page came along
    except BaseException:
        kill_child(c)
        raise
    return c


def kill_child(c: Tracee) -> None:
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


def discard(snap: Snapshot) -> None:
    kill_child(snap.child)
    snap.copies = []


# --- writeback ---------------------------------------------------------------

def writeback(snap: Snapshot, fd: int, *, compress: bool = False, name: str = "image",
              progress=None) -> dict:
    """A normal image of the process as it was at the snapshot moment."""
    t0 = time.monotonic()
    if snap.table.blockers:
        raise NotCheckpointable(snap.pid, snap.table.blockers)
    if not snap.alive():
        raise LcrError(f"snapshot {snap.crid}: its snapshot process is gone", "take a new snapshot")
    task = snap.task
    tree = Tree(root=snap.pid, files=snap.table.descs, pipes=snap.table.pipe_list(),
                unix=snap.table.unix_list(), shm=snap.shm, mapped=snap.mapped, zombies=[])
    normal = [v for v in task.vmas if v.pages and not _special(v)]
    child = snap.child
    ring = memory._ring()

    def chunks():
        for i, (addr, n) in enumerate(memory.page_runs(child.pid, normal)):
            view = ring[i % RING][: n * PAGE]
            child.readinto(addr, view)
            yield addr, view

    def pages(w: ImageWriter) -> None:
        for addr, view in prefetch(chunks()):
            w.page_run(snap.pid, addr, view)
            if progress:
                progress(len(view))
        for addr, buf in snap.copies:
            for off in range(0, len(buf), memory.CHUNK):
                w.page_run(snap.pid, addr + off, memoryview(buf)[off:off + memory.CHUNK])

    w = dump.write_image(fd, snap.pid, [task], tree, pages, compress=compress, name=name)
    return dict(pages=w.pages, bytes=w.bytes_written, seconds=time.monotonic() - t0)


# --- rollback -----------------------------------------------------------------

def rollback(snap: Snapshot, *, memory_only: bool = False) -> dict:
    """Bring the live process back to the snapshot (same pid)."""
    t0 = time.monotonic()
    pid, task = snap.pid, snap.task
    try:
        same = read_stat(pid).starttime == snap.starttime
    except (FileNotFoundError, ProcessLookupError):
        same = False
    if not same:
        raise NoSuchProcess(f"pid {pid}: the process snapshot {snap.crid} was taken of has exited",
                            "use lcr writeback and lcr restart instead")
    if not snap.alive():
        raise LcrError(f"snapshot {snap.crid}: its snapshot process is gone", "take a new snapshot")
    _precheck_files(task)
    fz = Frozen(pid)
    try:
        fz.freeze()
        pairs = _pair_threads(fz, task)
    except BaseException:
        fz.thaw()
        raise
    warnings: list[str] = []
    try:
        fz.block_signals()
        _rollback_frozen(snap, fz, pairs, memory_only, warnings)
    except BaseException as e:
        # the address space may be half rebuilt: the process cannot go on
        fz.send_kill()
        for th in fz.threads.values():
            th.detach()
        if isinstance(e, LcrError):
            raise RestoreError(f"rollback of pid {pid} failed midway ({e}); the process was killed") from None
        raise RestoreError(f"rollback of pid {pid} failed midway ({type(e).__name__}: {e}); "
                           "the process was killed") from None
    fz.thaw()
    return dict(pid=pid, seconds=time.monotonic() - t0, warnings=warnings,
                memory_only=memory_only)


def _precheck_files(task: Task) -> None:
    """Everything the rebuilt address space maps must still exist."""
    for v in task.vmas:
        if v.kind == "file" and not os.access(v.path, os.R_OK):
            raise RollbackRefused(f"cannot roll back pid {task.pid}: {v.path} (mapped at "
                                  f"0x{v.start:x}) is gone or unreadable")


def _pair_threads(fz: Frozen, task: Task) -> list[tuple[Tracee, object]]:
    """(live thread, its saved state); the same tids, or at least as many."""
    saved = [task] + list(task.threads)
    live = [fz.leader] + fz.others()
    if len(live) != len(saved):
        raise RollbackRefused(f"cannot roll back pid {task.pid}: it has {len(live)} threads now, "
                              f"the snapshot {len(saved)}",
                              "rollback needs the same number of threads")
    by_tid = {t.pid: t for t in live}
    if all(s.tid in by_tid for s in saved):
        return [(by_tid[s.tid], s) for s in saved]
    return list(zip(live, [task] + sorted(task.threads, key=lambda th: th.tid)))


def _vdso_insn(t: Tracee, vmas: list[Vma]) -> int:
    text = memory.vdso_text(vmas)
    if text:
        at = t.read(text[0], text[1] - text[0]).find(b"\x0f\x05")
        if at >= 0:
            return text[0] + at
    raise RollbackRefused(f"cannot roll back pid {t.pid}: no vDSO to run system calls from")


def _same_shared(a: Vma, b: Vma) -> bool:
    return (a.start, a.end, a.kind, a.shared) == (b.start, b.end, b.kind, b.shared) and a.shared \
        and (a.shm == b.shm if a.kind == "shmem" else a.path == b.path and a.offset == b.offset)


def _rollback_frozen(snap: Snapshot, fz: Frozen, pairs, memory_only: bool,
                     warnings: list[str]) -> None:
    pid, task, t = snap.pid, snap.task, fz.leader
    now = memory.collect(read_smaps(pid))
    if [(v.kind, v.start, v.end) for v in now if v.kind in memory.VDSO_KINDS] != \
            [(v.kind, v.start, v.end) for v in task.vmas if v.kind in memory.VDSO_KINDS]:
        raise RollbackRefused(f"cannot roll back pid {pid}: its vDSO moved since the snapshot")
    insn = _vdso_insn(t, task.vmas)
    for th in fz.threads.values():
        th.insn = insn
    # rseq: the kernel writes into a thread's rseq area on every return to
    # user space (SIGSEGV if unmapped): unregister while we rebuild
    for live, saved in pairs:
        cpu.unregister_rseq(live)
    # scratch space at an address free in both layouts
    gap = _free_gap(task, pid)
    t.syscall("mmap", gap, TRAMPOLINE, 3, 0x22 | 0x100000, (1 << 64) - 1, 0)
    arena = Arena(t, gap, TRAMPOLINE)
    inherited = (lambda st: st.sig_cgt | st.sig_ign)(read_status(pid))

    # 1. the address space: keep the vDSO, the scratch, identical shared areas
    kept = [c for c in now if c.kind not in memory.VDSO_KINDS
            and any(_same_shared(c, v) for v in task.vmas)]
    keep = sorted([(v.start, v.end) for v in now if v.kind in memory.VDSO_KINDS]
                  + [(c.start, c.end) for c in kept] + [(gap, gap + TRAMPOLINE)])
    prev = 0
    from linuxcr.sys.syscalls import TASK_SIZE
    for s, e in keep + [(TASK_SIZE, TASK_SIZE)]:
        if s > prev:
            t.syscall("munmap", prev, s - prev)
        prev = max(prev, e)
    kept_ranges = {(c.start, c.end) for c in kept}
    remap = [v for v in task.vmas if (v.start, v.end) not in kept_ranges or not v.shared]
    shmfds: dict[int, int] = {}
    try:
        for o in snap.shm:
            if any(v.kind == "shmem" and v.shm == o.id for v in remap):
                fd = t.syscall("memfd_create", arena.cstr("lcr-shm"), 1)   # MFD_CLOEXEC
                shmfds[o.id] = fd
                t.syscall("ftruncate", fd, o.size)
        memory.map_areas(t, remap, arena, shmfds)
    finally:
        for fd in shmfds.values():
            t.syscall("close", fd, check=False)
    # 2. the pages
    _pour(snap, t, [v for v in task.vmas if v.pages and not _special(v)])
    memory.protect_areas(t, remap)
    # 3. kernel view of the memory layout (brk) when it moved
    arena.reset()
    if t.syscall("brk", 0) != task.mm.brk:
        try:
            process.restore_mm(t, arena, task.mm, os.readlink(f"/proc/{pid}/exe"))
        except LcrError as e:
            warnings.append(f"program break not restored: {e}")
    # 4. signals, per-thread state
    signals.restore_actions(t, arena, task.sigactions, inherited)
    for live, saved in pairs:
        arena.reset()
        if live.pid != saved.tid:      # a thread made since: its kernel-side pointers
            if saved.robust_list[0]:
                live.syscall("set_robust_list", saved.robust_list[0], saved.robust_list[1])
            live.syscall("set_tid_address", saved.tid_address)
        if saved.altstack[1] & SS_DISABLE:
            live.syscall("sigaltstack", arena.put(signals._STACK_T.pack(0, SS_DISABLE, 0, 0)), 0,
                         check=False)
        else:
            signals.restore_altstack(live, arena, saved.altstack)
        cpu.register_rseq(live, list(saved.rseq))
    # 5. files
    if not memory_only:
        arena.reset()
        warnings += _rollback_files(snap, t, arena)
        try:
            files.restore_fs(t, arena, task.cwd, "/")
        except LcrError as e:
            warnings.append(str(e))
        t.syscall("umask", task.umask)
    t.syscall("munmap", gap, TRAMPOLINE)
    # 6. registers, FPU and masks come back at thaw
    for live, saved in pairs:
        cpu.restore_fpu(live, saved.xstate)
        live.saved_regs = cpu.final_regs(saved.regs)
        fz.masks[live.pid] = saved.sigmask


def _pour(snap: Snapshot, t: Tracee, normal: list[Vma]) -> None:
    """Pages from the snapshot child into the live process, then the copies."""
    child = snap.child
    ring = memory._ring()

    def chunks():
        for i, (addr, n) in enumerate(memory.page_runs(child.pid, normal)):
            view = ring[i % RING][: n * PAGE]
            child.readinto(addr, view)
            yield addr, view

    for addr, view in prefetch(chunks()):
        t.write(addr, view)
    for addr, buf in snap.copies:
        t.write(addr, buf)


def _fd_key(pid: int, fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _rollback_files(snap: Snapshot, t: Tracee, arena: Arena) -> list[str]:
    """Offsets back; fds opened since closed; regular files closed since reopened.
    Pipes, sockets and other kinds are left as they are."""
    pid, warnings = snap.pid, []
    saved = {f.fd: f for f in snap.task.files}
    descs = {d.fid: d for d in snap.table.descs}
    for fd in list_fds(pid):
        if fd not in snap.table.keys:
            t.syscall("close", fd, check=False)
    reopened: dict[int, int] = {}     # fid -> fd number it now lives on
    for fd, key in sorted(snap.table.keys.items()):
        f = saved.get(fd)
        d = descs.get(f.fid) if f else None
        now = _fd_key(pid, fd)
        if now == key:
            if d is not None and d.kind in ("reg", "dir"):
                t.syscall("lseek", fd, d.pos, SEEK_SET, check=False)
                t.syscall("fcntl", fd, F_SETFL, d.flags & files.STATUS_FLAGS, check=False)
            if f is not None:
                t.syscall("fcntl", fd, F_SETFD, FD_CLOEXEC if f.cloexec else 0, check=False)
            continue
        if d is None or d.kind not in ("reg", "dir", "chr"):
            kind = d.kind if d is not None else "file"
            warnings.append(f"fd {fd} ({kind}) was closed or replaced since the snapshot: "
                            "left as it is now (only regular files are reopened)")
            continue
        arena.reset()
        if d.fid in reopened:
            src, temp = reopened[d.fid], False
        else:
            try:
                src = arena.open(d.path, d.flags & files.REOPEN_FLAGS, what=f"fd {fd}")
            except LcrError as e:
                warnings.append(f"fd {fd}: {e}")
                continue
            temp = True
            if d.pos:
                t.syscall("lseek", src, d.pos, SEEK_SET, check=False)
        t.syscall("dup3", src, fd, files.O_CLOEXEC if f.cloexec else 0)
        if temp:
            t.syscall("close", src, check=False)
        reopened.setdefault(d.fid, fd)
    return warnings


__all__ = ["Snapshot", "take", "writeback", "rollback", "discard", "RollbackRefused"]
