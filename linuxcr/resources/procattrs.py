"""Process-wide attributes: oom_score_adj, the parent-death signal, the
child-subreaper flag, THP disable, the dumpable flag, membarrier
registrations, mlockall(MCL_FUTURE) and the locked areas (mlock).

Dump: prctl() queries injected into the frozen leader; membarrier
registrations by one MEMBARRIER_CMD_GET_REGISTRATIONS (Linux 6.3; global
expedited included), or before that by asking for each private expedited
barrier (EPERM: not registered; the barrier itself is harmless; the global
registration then cannot be seen and is not restored); MCL_FUTURE by
whether lcr's own scratch mapping came out locked (VmLck before and after
it), and only then by mapping one page and seeing whether the kernel
populates it (mincore: no, with MCL_ONFAULT).  Each injected call into a
live task costs three ptrace stops: these two save 2-4 per process.

Restore: restore() before the task takes its identity back (lowering
oom_score_adj, locking memory may need privilege), after its pages and
limits; restore_late() at the very end, because setresuid() resets the
dumpable flag and the parent-death signal."""
from __future__ import annotations

import os
import signal

from linuxcr.errors import RestoreError
from linuxcr.image.schema import ProcAttrs, Vma
from linuxcr.procfs import read_oom_score_adj, read_status
from linuxcr.remote.task import Arena, Tracee

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_THP_DISABLE_EXCEPT_ADVISED = 1 << 1
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MLOCK_ONFAULT = 1
CAP_SYS_RESOURCE = 24
PAGE = 4096
# MEMBARRIER_CMD_PRIVATE_EXPEDITED{,_SYNC_CORE,_RSEQ} -> its REGISTER_ command
MEMBARRIER = {8: 16, 32: 64, 128: 256}
MEMBARRIER_PRIVATE_EXPEDITED, MEMBARRIER_REGISTER_PRIVATE_EXPEDITED = 8, 16
MEMBARRIER_REGISTER_GLOBAL_EXPEDITED = 4
MEMBARRIER_GET_REGISTRATIONS = 512
# every REGISTER_ command, in the order restore repeats them
MEMBARRIER_REGISTERS = (MEMBARRIER_REGISTER_GLOBAL_EXPEDITED, *MEMBARRIER.values())


def vmlck(pid: int) -> int:
    """VmLck (kB).  Compared before and after lcr maps its scratch in the
    frozen task (nothing else maps there meanwhile), it tells MCL_FUTURE."""
    return int(read_status(pid).raw.get("VmLck", "0 kB").split()[0])


def _mlockall(t: Tracee) -> int:
    """MCL_FUTURE (| MCL_ONFAULT) if the task locks what it maps from now on."""
    before = vmlck(t.pid)
    try:
        addr = t.syscall("mmap", 0, PAGE, 3, 0x22, (1 << 64) - 1, 0)
    except OSError:
        return MCL_FUTURE        # EAGAIN: it would be locked, over RLIMIT_MEMLOCK
    try:
        if vmlck(t.pid) == before:
            return 0
        vec = addr + PAGE - 1    # mincore writes one byte: the page's last
        t.syscall("mincore", addr, PAGE, vec)
        resident = t.read(vec, 1)[0] & 1
        return MCL_FUTURE | (0 if resident else MCL_ONFAULT)
    finally:
        t.syscall("munmap", addr, PAGE, check=False)


def mlockall_now(t: Tracee) -> int:
    """mlockall()'s MCL_FUTURE (| MCL_ONFAULT) as the frozen task has it now."""
    return _mlockall(t)


def membarrier_registrations(t: Tracee) -> int:
    """The MEMBARRIER_CMD_REGISTER_* commands the task's process has made."""
    got = t.syscall("membarrier", MEMBARRIER_GET_REGISTRATIONS, 0, 0, check=False)
    if got < 0:            # before Linux 6.3: probe each private barrier
        return sum(reg for cmd, reg in MEMBARRIER.items()
                   if t.syscall("membarrier", cmd, 0, 0, check=False) == 0)
    regs = got & sum(MEMBARRIER_REGISTERS)
    # registering SYNC_CORE or RSEQ marks the plain private state too (the
    # kernel reports REGISTER_PRIVATE_EXPEDITED) without making that barrier
    # usable: whether it is, only the barrier says
    if regs & (64 | 256) \
            and regs & MEMBARRIER_REGISTER_PRIVATE_EXPEDITED \
            and t.syscall("membarrier", MEMBARRIER_PRIVATE_EXPEDITED, 0, 0, check=False) != 0:
        regs &= ~MEMBARRIER_REGISTER_PRIVATE_EXPEDITED
    return regs


def dump(t: Tracee, arena: Arena, scratch_locked: bool | None = None) -> ProcAttrs:
    """``t``: the frozen leader.  ``scratch_locked``: whether lcr's scratch
    mapping in it came out locked (None: not known; probe)."""
    out = arena.alloc(8)

    def get_int(option: int) -> int:
        t.syscall("prctl", option, out, 0, 0, 0)
        return int.from_bytes(t.read(out, 4), "little", signed=True)

    return ProcAttrs(oom_score_adj=read_oom_score_adj(t.pid), pdeathsig=get_int(PR_GET_PDEATHSIG),
                     subreaper=bool(get_int(PR_GET_CHILD_SUBREAPER)),
                     thp_disable=t.syscall("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0),
                     dumpable=t.syscall("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0),
                     membarrier=membarrier_registrations(t),
                     mlockall=0 if scratch_locked is False else _mlockall(t))


def _may_lower_oom() -> bool:
    return bool(read_status(os.getpid()).cap_eff >> CAP_SYS_RESOURCE & 1)


def check(pid: int) -> list[str]:
    """What the caller could not give back."""
    try:
        adj = read_oom_score_adj(pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    mine = read_oom_score_adj(os.getpid())
    if adj < mine and not _may_lower_oom():
        return [f"its oom_score_adj is {adj}, lower than lcr's ({mine}): restoring it needs "
                "CAP_SYS_RESOURCE, which you lack"]
    return []


def set_oom_score_adj(pid: int, adj: int) -> None:
    """Write pid's oom_score_adj when it is not ``adj`` already (OSError)."""
    if read_oom_score_adj(pid) != adj:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(adj))


def restore(t: Tracee, p: ProcAttrs | None, vmas: list[Vma]) -> None:
    """Before the task's identity: oom_score_adj, subreaper, THP, membarrier, locks."""
    if p is None:
        return
    try:
        what = f"oom_score_adj {p.oom_score_adj}"
        set_oom_score_adj(t.pid, p.oom_score_adj)
        what = "the child-subreaper flag"
        if p.subreaper:
            t.syscall("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        what = "PR_SET_THP_DISABLE"
        if p.thp_disable:
            t.syscall("prctl", PR_SET_THP_DISABLE, 1, p.thp_disable & PR_THP_DISABLE_EXCEPT_ADVISED,
                      0, 0)
        for reg in MEMBARRIER_REGISTERS:
            what = f"membarrier registration {reg}"
            if p.membarrier & reg:
                t.syscall("membarrier", reg, 0, 0)
        restore_locks(t, p, vmas)
    except OSError as e:
        raise RestoreError(f"pid {t.pid}: cannot restore {what}: {e.strerror}") from None


def restore_locks(t: Tracee, p: ProcAttrs | None, vmas: list[Vma]) -> None:
    """mlock every area that was locked (after its pages are in), then
    mlockall(MCL_FUTURE) for what the program maps later."""
    for v in vmas:
        if "lo" in v.vmflags:
            try:
                t.syscall("mlock2", v.start, v.end - v.start, MLOCK_ONFAULT if "lf" in v.vmflags else 0,
                          check=v.prot != 0)   # PROT_NONE: locked, but cannot be populated (ENOMEM)
            except OSError as e:
                raise RestoreError(f"pid {t.pid}: cannot lock its memory 0x{v.start:x}-0x{v.end:x}: "
                                   f"{e.strerror}", "RLIMIT_MEMLOCK or CAP_IPC_LOCK") from None
    if p is not None and p.mlockall:
        t.syscall("mlockall", p.mlockall)


def restore_late(t: Tracee, p: ProcAttrs | None, is_root: bool) -> list[str]:
    """Last (setresuid resets both): the dumpable flag, the parent-death signal.
    The tree's root gets no parent-death signal: its parent (not saved) is
    lcr, whose exit would fire it at once."""
    if p is None:
        return []
    warnings = []
    if p.dumpable != t.syscall("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0):
        if p.dumpable not in (0, 1):
            raise RestoreError(f"pid {t.pid}: its dumpable flag {p.dumpable} (suid_dumpable) "
                               "cannot be set again")
        t.syscall("prctl", PR_SET_DUMPABLE, p.dumpable, 0, 0, 0)
    if p.pdeathsig and is_root:
        warnings.append(f"pid {t.pid}: its parent-death signal "
                        f"({signal.Signals(p.pdeathsig).name if p.pdeathsig < 32 else p.pdeathsig})"
                        " is not restored: its parent is not part of the image")
    elif p.pdeathsig:
        t.syscall("prctl", PR_SET_PDEATHSIG, p.pdeathsig, 0, 0, 0)
    return warnings


def roll_back(t: Tracee, p: ProcAttrs | None) -> list[str]:
    """Rollback, before the identity: oom_score_adj, subreaper, THP disable
    set to the snapshot's (cleared too); membarrier registrations made since
    cannot be undone (a warning).  Memory locks: resources/areaflags.py."""
    if p is None:
        return []
    warnings = []
    try:
        what = f"oom_score_adj {p.oom_score_adj}"
        set_oom_score_adj(t.pid, p.oom_score_adj)
        what = "the child-subreaper flag"
        t.syscall("prctl", PR_SET_CHILD_SUBREAPER, int(p.subreaper), 0, 0, 0)
        what = "PR_SET_THP_DISABLE"
        if t.syscall("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0) != p.thp_disable:
            t.syscall("prctl", PR_SET_THP_DISABLE, int(bool(p.thp_disable)),
                      p.thp_disable & PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0)
    except OSError as e:
        warnings.append(f"pid {t.pid}: {what} not rolled back: {e.strerror}")
    now = membarrier_registrations(t)
    for reg in MEMBARRIER_REGISTERS:
        if not p.membarrier & reg and now & reg:
            warnings.append(f"pid {t.pid}: its membarrier registration {reg}, made since the "
                            "snapshot, stays (it cannot be undone)")
        elif p.membarrier & reg and not now & reg:
            t.syscall("membarrier", reg, 0, 0, check=False)
    return warnings


def roll_back_late(t: Tracee, p: ProcAttrs | None) -> list[str]:
    """Rollback, last: dumpable and the parent-death signal (0 too) as at the snapshot."""
    if p is None:
        return []
    warnings = []
    if p.dumpable != t.syscall("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0):
        if p.dumpable in (0, 1):
            t.syscall("prctl", PR_SET_DUMPABLE, p.dumpable, 0, 0, 0)
        else:
            warnings.append(f"pid {t.pid}: its dumpable flag {p.dumpable} (suid_dumpable) "
                            "cannot be set again")
    t.syscall("prctl", PR_SET_PDEATHSIG, p.pdeathsig, 0, 0, 0)
    return warnings
