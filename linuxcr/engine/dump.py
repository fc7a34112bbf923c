"""Checkpoint orchestration: the order of things, no resource details.

check (no stop) -> seize + stop -> check again -> inject the few queries
that /proc cannot answer -> write TASK record -> copy pages -> trailer ->
kill (default) or resume exactly as before (--leave-running).
Any failure after the stop puts registers and signal mask back and detaches.
"""
from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass, field

from linuxcr import __version__
from linuxcr.errors import LcrError, NoSuchProcess, NotCheckpointable
from linuxcr.image.schema import MAGIC, FORMAT_VERSION, ARCH, Header, RecType, Task
from linuxcr.image.stream import PAGE, ImageWriter
from linuxcr.procfs import read_smaps, read_stat, read_status
from linuxcr.remote.freezer import Frozen
from linuxcr.remote.task import Arena
from linuxcr.resources import cpu, files, memory, process, signals, threads


@dataclass
class DumpResult:
    pid: int
    pages: int
    bytes_written: int
    seconds: float
    frozen_seconds: float
    warnings: list[str] = field(default_factory=list)


def check_process(pid: int, smaps=None) -> list[str]:
    """Every reason, known without stopping the process, that it cannot be saved."""
    if pid == os.getpid():
        return ["lcr cannot checkpoint itself"]
    try:
        st = read_status(pid)
        smaps = read_smaps(pid) if smaps is None else smaps
    except FileNotFoundError:
        raise NoSuchProcess(f"pid {pid}: no such process") from None
    except PermissionError:
        from linuxcr.remote.task import _explain_eperm
        raise _explain_eperm(pid) from None
    reasons = []
    if st.state == "Z":
        reasons.append("it is a zombie (it has exited; only its parent can reap it)")
    if not smaps and st.state != "Z":
        reasons.append("it is a kernel thread")
    if st.tgid != pid:
        reasons.append(f"it is a thread of process {st.tgid}; checkpoint that pid instead")
    reasons += memory.check(smaps)
    reasons += files.check(pid)
    return reasons


def checkpoint(pid: int, fd: int, *, leave_running: bool = False, compress: bool = False,
               name: str = "image", on_written=None, progress=None) -> DumpResult:
    """Write an image of process pid to fd.  ``on_written`` runs after the
    trailer is written and before the process is killed (files: rename)."""
    t0 = time.monotonic()
    reasons = check_process(pid)
    if reasons:
        raise NotCheckpointable(pid, reasons)
    frozen = Frozen(pid)
    frozen_at = time.monotonic()
    try:
        frozen.freeze()
        smaps = read_smaps(pid)          # final: nothing changes while it is stopped
        reasons = check_process(pid, smaps)   # it may have changed before we stopped it
        if reasons:
            raise NotCheckpointable(pid, reasons)
        task, vmas = _collect(frozen, smaps)
        xfeat, xsize = cpu.xstate_features(task.xstate)
        w = ImageWriter(fd, compress=compress, name=name)
        w.header(Header(magic=MAGIC, version=FORMAT_VERSION, arch=ARCH, kernel=platform.release(),
                        page_size=PAGE, created=time.time(), hostname=socket.gethostname(),
                        tool=f"linuxcr {__version__}", xfeatures=xfeat, xstate_size=xsize,
                        root_pid=pid, flags=["compressed"] if compress else []))
        w.record(RecType.TASK, task)
        pages = memory.dump_pages(frozen.leader, vmas, w, progress)
        w.finish()
        if on_written:
            on_written()
    except BaseException:
        frozen.thaw()
        raise
    if leave_running:
        frozen.thaw()
    else:
        frozen.kill()
    done = time.monotonic()
    return DumpResult(pid=pid, pages=pages, bytes_written=w.bytes_written, seconds=done - t0,
                      frozen_seconds=done - frozen_at)


def _collect(frozen: Frozen, smaps) -> tuple[Task, list]:
    """Everything but the pages, with the process frozen."""
    pid, t = frozen.pid, frozen.leader
    status, stat = read_status(pid), read_stat(pid)
    vmas = memory.collect(smaps)     # taken before our scratch page exists
    insn = t.find_syscall_insn(memory.vdso_text(vmas))
    for th in frozen.threads.values():
        th.insn = insn
    frozen.block_signals()           # nothing gets delivered while we work
    with t.scratch() as addr:
        arena = Arena(t, addr, PAGE)
        actions = signals.dump_actions(t, arena, status.sig_cgt, status.sig_ign)
        altstack = signals.dump_altstack(t, arena)
        itimers = signals.dump_itimers(t, arena)
        brk = t.syscall("brk", 0)
        tinfo = process.dump_threadinfo(t, arena)
        others = [threads.dump_thread(pid, th, arena, frozen.masks[th.pid]) for th in frozen.others()]
    task = Task(
        pid=pid, tid=pid, ppid=stat.ppid, pgid=stat.pgrp, sid=stat.session, comm=stat.comm,
        cwd=os.readlink(f"/proc/{pid}/cwd"), root=os.readlink(f"/proc/{pid}/root"),
        creds=process.dump_creds(status), umask=status.umask or 0,
        personality=process.read_personality(pid), rlimits=process.dump_rlimits(pid),
        mm=process.dump_mm(pid, stat, brk), vmas=vmas, files=files.dump(pid),
        sigmask=frozen.masks[pid], sigactions=actions, pending=signals.dump_pending(pid),
        altstack=altstack, threads=others, itimers=itimers, starttime=stat.starttime,
        vpid=status.ns_pid[-1], pidns_init=status.ns_pid[-1] == 1 and len(status.ns_pid) > 1,
        caps=[status.cap_inh, status.cap_prm, status.cap_eff, status.cap_bnd, status.cap_amb],
        boot_id=_boot_id(), **cpu.dump(t), **tinfo)
    return task, vmas


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


__all__ = ["checkpoint", "check_process", "DumpResult", "LcrError"]
