"""Restart orchestration: the order of things, no resource details.

Read and validate everything before the pages -> fork a child of lcr with
the saved pid (clone3 set_tid) -> seize it (EXITKILL: if lcr dies, it dies)
-> empty its address space but for a trampoline page -> rebuild memory,
files, signals, identity by injected syscalls -> pour pages in -> check the
trailer -> unmap the trampoline and return into the saved registers.
Any failure kills the half-built child: a restart yields a running process
or nothing.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field

from linuxcr.errors import ImageError, LcrError, PidTaken, RestoreError, KernelError
from linuxcr.pipeline import prefetch
from linuxcr.image.schema import Header, Pages, RecType, Task
from linuxcr.image.stream import PAGE, ImageReader
from linuxcr.procfs import read_maps, read_stat, read_status
from linuxcr.remote.task import ALL_SIGNALS, Arena, Tracee
from linuxcr.resources import cpu, files, memory, process, signals, threads
from linuxcr.sys import ptrace
from linuxcr.engine import spawn
from linuxcr.sys.syscalls import TASK_SIZE

ARCH_MAP_VDSO_64 = 0x2003
TRAMPOLINE = 16 * PAGE          # one page of code, the rest scratch for arguments
MIN_ADDR = 0x1000000
PID_WAIT = 30.0                 # seconds to wait for the original to be reaped


@dataclass
class RestoreResult:
    pid: int                  # as lcr sees it
    original_pid: int
    pages: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    vpid: int = 0             # as the process sees itself
    namespace: bool = False   # restored into a new pid namespace


def validate_task(task: Task) -> None:
    """Reject layouts the kernel would refuse or that would overlap, before
    any process exists."""
    prev_end = 0
    for v in task.vmas:
        if v.start % PAGE or v.end % PAGE or not v.start < v.end <= TASK_SIZE or v.start < prev_end:
            raise ImageError(f"image holds an invalid memory area 0x{v.start:x}-0x{v.end:x}")
        if v.kind not in ("anon", "file", "shmem") + memory.VDSO_KINDS:
            raise ImageError(f"image holds a memory area of unknown kind {v.kind!r}")
        if v.kind == "file" and not v.path.startswith("/"):
            raise ImageError(f"image holds a file mapping with a relative path {v.path!r}")
        prev_end = v.end
    seen = set()
    for f in task.files:
        if f.fd in seen or (f.dup_of is not None and f.dup_of not in seen):
            raise ImageError(f"image holds an inconsistent fd table at fd {f.fd}")
        if f.kind not in ("reg", "dir", "chr") or not f.path.startswith("/"):
            raise ImageError(f"image holds fd {f.fd} of unsupported kind {f.kind!r}")
        seen.add(f.fd)
    if len(task.regs) != 216 or len(task.altstack) != 3 or len(task.robust_list) != 2 \
            or len(task.rseq) not in (0, 3) or len(task.creds.uid) != 4 or len(task.creds.gid) != 4:
        raise ImageError("image holds a malformed task record")


def _check_vdso(task: Task) -> None:
    """The new task gets this kernel's vDSO; glibc holds pointers into the
    saved one, so both must have the same layout."""
    saved = [(v.kind, v.end - v.start) for v in task.vmas if v.kind in memory.VDSO_KINDS]
    local = [(m.path.strip("[]"), m.end - m.start) for m in read_maps(os.getpid())
             if m.path in ("[vvar]", "[vvar_vclock]", "[vdso]")]
    if saved and saved != local:
        raise RestoreError(f"the image's vDSO layout {saved} differs from this kernel's {local}",
                           "restart on a machine running the same kernel")


def _free_gap(task: Task, pid: int) -> int:
    """An address free both in the image's layout and in the new task."""
    busy = sorted([(v.start, v.end) for v in task.vmas] + [(m.start, m.end) for m in read_maps(pid)])
    addr = MIN_ADDR
    for start, end in busy:
        if addr + TRAMPOLINE <= start:
            break
        addr = max(addr, (end + PAGE - 1) & ~(PAGE - 1))
    if addr + TRAMPOLINE > TASK_SIZE:
        raise RestoreError("no free address for the restore trampoline")
    return addr


def _is_original(pid: int, task: Task) -> tuple[bool, str]:
    """Is pid still held by the very process the image was taken from?"""
    try:
        st = read_stat(pid)
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return False, ""
    return st.starttime == task.starttime and boot == task.boot_id, st.state


def _claim_pid(pid: int, task: Task, reader: ImageReader) -> None:
    """Make sure the saved pid is free, waiting for the original to go away.

    `lcr checkpoint P -o - | lcr restart -` kills P only after the trailer,
    so when the image comes through a pipe and P still runs we take the rest
    of the stream into memory first, then wait for P to be gone."""
    if not os.path.exists(f"/proc/{pid}"):
        return
    original, state = _is_original(pid, task)
    if not original:
        if not os.path.exists(f"/proc/{pid}"):
            return
        raise PidTaken(f"pid {pid} is in use by another process",
                       "stop that process, or restart with --any-pid")
    if state != "Z" and not _seekable(reader.fd):
        reader.buffer_rest()
    deadline = time.monotonic() + PID_WAIT
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            raise PidTaken(f"pid {pid} is still held by the process the image was taken from",
                           "it was checkpointed with --leave-running? kill it, or restart with --any-pid")
        time.sleep(0.02)


def _seekable(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        return True
    except OSError:
        return False


def restore_mode(task: Task, any_pid: bool) -> str:
    """host: the saved pid in lcr's pid namespace (root) or any pid;
    ns-init: a new pid namespace whose pid 1 is the task (`lcr run` images);
    ns: a new pid namespace (and user namespace) with the saved pid inside."""
    if task.pidns_init:
        return "ns-init"
    if any_pid:
        return "host"
    if os.geteuid() == 0 and (task.vpid or task.pid) == task.pid:
        return "host"
    return "ns"


def _make_blank(task: Task, reader: ImageReader, any_pid: bool) -> spawn.Blank:
    mode = restore_mode(task, any_pid)
    vpid = task.vpid or task.pid
    if mode == "host":
        want = None if any_pid else vpid
        if want is not None:
            _claim_pid(want, task, reader)
        return spawn.in_host(want)
    return spawn.in_new_namespaces(1 if mode == "ns-init" else vpid, user_ns=os.geteuid() != 0)


def restart(fd: int, *, any_pid: bool = False, name: str = "image") -> RestoreResult:
    t0 = time.monotonic()
    reader = ImageReader(fd, name=name)
    header = reader.read_header()
    rec = reader.next()
    if rec.type is not RecType.TASK:
        raise ImageError(f"{name} is corrupt: expected a task record after the header")
    task: Task = rec.meta  # type: ignore[assignment]
    validate_task(task)
    reason = process.check_creds(task)
    if reason:
        raise RestoreError(reason)
    _check_vdso(task)
    try:
        blank = _make_blank(task, reader, any_pid)
        pid = blank.pid
        t = Tracee(pid, exitkill=True, traceclone=bool(task.threads))
        try:
            t.seize()
            t.stop()
            pages, warnings, made = _rebuild(t, task, header, reader)
        except BaseException as e:
            _destroy(t)
            if isinstance(e, OSError):
                raise RestoreError(f"restore of pid {task.pid} failed: {e}") from None
            raise
        finally:
            os.close(blank.keep)
        for th in made:
            th.detach()
        t.detach()
    finally:
        reader.close()
    return RestoreResult(pid=pid, original_pid=task.pid, pages=pages,
                         seconds=time.monotonic() - t0, warnings=warnings,
                         vpid=task.vpid or task.pid, namespace=blank.init_pid is not None or task.pidns_init)


def _rebuild(t: Tracee, task: Task, header: Header,
             reader: ImageReader) -> tuple[int, list[str], list[Tracee]]:
    pid = t.pid
    local_xstate = ptrace.get_xstate(pid)
    reason = cpu.check_restorable(task.xstate, local_xstate)
    if reason:
        raise RestoreError(reason, "restart on a machine with the same CPU features")
    inherited = read_status(pid)
    inherited_exe = os.readlink(f"/proc/{pid}/exe")
    own_vdso = next(((m.start, m.end) for m in read_maps(pid) if m.path == "[vdso]"), None)
    t.insn = t.find_syscall_insn(own_vdso)
    ptrace.set_sigmask(pid, ALL_SIGNALS)
    cpu.unregister_rseq(t)
    t.syscall("close_range", 0, 0xFFFFFFFF, 0)

    # A trampoline page of our own; then nothing else of lcr's copy stays.
    tramp = _free_gap(task, pid)
    t.syscall("mmap", tramp, TRAMPOLINE, 7, 0x22 | 0x100000, (1 << 64) - 1, 0)  # RWX, FIXED_NOREPLACE
    t.write(tramp, b"\x0f\x05")
    t.insn = tramp
    arena = Arena(t, tramp + PAGE, TRAMPOLINE - PAGE)
    t.syscall("munmap", 0, tramp)
    t.syscall("munmap", tramp + TRAMPOLINE, TASK_SIZE - tramp - TRAMPOLINE)
    vdso = memory.vdso_area(task.vmas)
    if vdso:
        t.syscall("arch_prctl", ARCH_MAP_VDSO_64, vdso[0])

    memory.map_areas(t, task.vmas, arena)
    pages = _fill_pages(t, task, reader)
    memory.protect_areas(t, task.vmas)
    process.restore_mm(t, arena, task.mm, inherited_exe)
    files.restore(t, arena, task.files)
    files.restore_fs(t, arena, task.cwd, task.root)
    process.restore_misc(t, arena, task)
    process.restore_session(t, task)
    signals.restore_actions(t, arena, task.sigactions, inherited.sig_cgt | inherited.sig_ign)
    signals.restore_altstack(t, arena, task.altstack)
    signals.restore_itimers(t, arena, task.itimers)
    warnings = process.restore_rlimits(pid, task.rlimits)
    made = []
    for th in task.threads:   # threads share everything restored so far
        new = threads.create(t, arena, th, tramp)
        made.append(new)
        threads.restore_thread(new, arena, th)
    process.restore_creds(t, arena, task.creds)
    vpid = task.vpid or task.pid    # the task names itself so in its namespace
    signals.queue_pending(t, arena, task.pending, vpid, vpid)
    for th in task.threads:
        signals.queue_pending(t, arena, th.pending, vpid, th.vtid)
        threads.finish_thread(new, th)
    process.restore_caps(t, arena, task.caps, _caps_now(pid))
    cpu.register_rseq(t, task.rseq)
    t.syscall("munmap", tramp, TRAMPOLINE)      # the last thing the task does for us
    cpu.restore_fpu(t, task.xstate)
    t.set_regs(cpu.final_regs(task.regs))
    ptrace.set_sigmask(pid, task.sigmask)
    return pages, warnings, made


def _caps_now(pid: int) -> tuple[int, int, int]:
    st = read_status(pid)
    return st.cap_inh, st.cap_prm, st.cap_eff


def _records(reader: ImageReader):
    while True:
        rec = reader.next()
        yield rec
        if rec.type is RecType.TRAILER:
            return


def _fill_pages(t: Tracee, task: Task, reader: ImageReader) -> int:
    """Pour pages into the task; a helper thread reads (and checks) the next
    record from the image meanwhile."""
    total = 0
    for rec in prefetch(_records(reader)):
        if rec.type is RecType.TRAILER:
            reader.expect_end()
            return total
        if rec.type is not RecType.PAGES:
            raise ImageError(f"{reader.name} is corrupt: unexpected {rec.type.name} record among pages")
        meta: Pages = rec.meta  # type: ignore[assignment]
        if meta.pid != task.pid or not memory.check_pages_fit(task.vmas, meta.addr, meta.npages):
            raise ImageError(f"{reader.name} is corrupt: pages at 0x{meta.addr:x} lie outside "
                             "every saved memory area")
        t.write(meta.addr, rec.data)
        total += meta.npages
    raise ImageError(f"{reader.name} is truncated: it ends without its trailer")


def _destroy(t: Tracee) -> None:
    try:
        os.kill(t.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    t.attached = False
    t.close()
    try:
        os.waitpid(t.pid, 0)
    except ChildProcessError:
        pass


__all__ = ["restart", "RestoreResult", "LcrError"]
