"""What a process is besides memory, CPU and files: identity (creds,
session), limits, umask, personality, name, and the mm fields that tell the
kernel where code, heap, arguments, environment and auxv live."""
from __future__ import annotations

import os
import resource
import struct

from linuxcr.errors import PermissionDenied, RestoreError
from linuxcr.image.schema import Creds, MmFields, Rlimit, Task
from linuxcr.procfs import ProcStat, ProcStatus, read_auxv
from linuxcr.remote.task import Arena, Tracee
from linuxcr.sys.syscalls import get_robust_list

PR_SET_NAME = 15
PR_SET_MM, PR_SET_MM_MAP = 35, 14
PR_GET_TID_ADDRESS = 40
RLIM_INF = (1 << 64) - 1
RLIM_NLIMITS = 16   # RLIMIT_CPU .. RLIMIT_RTTIME
_MM_MAP = struct.Struct("<11QQII")   # struct prctl_mm_map (104 bytes)


def _rl(v: int) -> int:
    return RLIM_INF if v == resource.RLIM_INFINITY else v


def _py_rl(v: int) -> int:
    return resource.RLIM_INFINITY if v == RLIM_INF else v


def dump_rlimits(pid: int) -> list[Rlimit]:
    out = []
    for res in range(RLIM_NLIMITS):
        soft, hard = resource.prlimit(pid, res)
        out.append(Rlimit(resource=res, soft=_rl(soft), hard=_rl(hard)))
    return out


def dump_mm(pid: int, stat: ProcStat, brk: int) -> MmFields:
    return MmFields(
        start_code=stat.start_code, end_code=stat.end_code, start_data=stat.start_data,
        end_data=stat.end_data, start_brk=stat.start_brk, brk=brk, start_stack=stat.start_stack,
        arg_start=stat.arg_start, arg_end=stat.arg_end, env_start=stat.env_start,
        env_end=stat.env_end, auxv=read_auxv(pid), exe=os.readlink(f"/proc/{pid}/exe"))


def dump_creds(status: ProcStatus) -> Creds:
    return Creds(uid=list(status.uid), gid=list(status.gid), groups=list(status.groups))


def dump_threadinfo(t: Tracee, arena: Arena) -> dict:
    """Kernel-held pointers glibc set up: robust futex list, clear_child_tid."""
    head, length = get_robust_list(t.pid)
    out = arena.alloc(8)
    t.syscall("prctl", PR_GET_TID_ADDRESS, out)
    tid_address = int.from_bytes(t.read(out, 8), "little")
    return dict(robust_list=[head, length], tid_address=tid_address)


def read_personality(pid: int) -> int:
    with open(f"/proc/{pid}/personality") as f:
        return int(f.read().strip(), 16)


# --- restore ---------------------------------------------------------------

def check_creds(task: Task) -> str | None:
    """A non-root caller may only restore its own identity."""
    me = os.geteuid()
    if me == 0:
        return None
    if set(task.creds.uid) != {me} or set(task.creds.gid) != {os.getegid()}:
        return (f"the image's process ran as uid {task.creds.uid[0]} gid {task.creds.gid[0]}; "
                f"you are uid {me}: only root can restore another user's process")
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def restore_mm(t: Tracee, arena: Arena, mm: MmFields, inherited_exe: str) -> None:
    """PR_SET_MM_MAP.  The task is a fork of lcr: when lcr runs the very same
    program (a Python image restored by lcr's Python) its exe link is right
    already, and the kernel refuses to replace an exe that is still mapped."""
    if _same_file(inherited_exe, mm.exe):
        exe_fd = -1
    else:
        exe_fd = arena.open(mm.exe, os.O_RDONLY, what="the program's executable")
    auxv = arena.put(mm.auxv)
    mm_map = _MM_MAP.pack(mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk,
                          mm.brk, mm.start_stack, mm.arg_start, mm.arg_end, mm.env_start,
                          mm.env_end, auxv, len(mm.auxv), exe_fd & 0xFFFFFFFF)
    try:
        t.syscall("prctl", PR_SET_MM, PR_SET_MM_MAP, arena.put(mm_map), _MM_MAP.size, 0)
    except OSError as e:
        raise RestoreError(f"the kernel refused the saved memory layout (PR_SET_MM_MAP): "
                           f"{e.strerror}") from None
    finally:
        if exe_fd >= 0:
            t.syscall("close", exe_fd, check=False)


def restore_misc(t: Tracee, arena: Arena, task: Task) -> None:
    t.syscall("umask", task.umask)
    t.syscall("personality", task.personality)
    t.syscall("prctl", PR_SET_NAME, arena.cstr(task.comm[:15]))
    if task.robust_list[0]:
        t.syscall("set_robust_list", task.robust_list[0], task.robust_list[1])
    t.syscall("set_tid_address", task.tid_address)


def restore_session(t: Tracee, task: Task) -> None:
    """A session or group leader becomes one again (its pid is its own)."""
    if task.sid == task.pid:
        t.syscall("setsid")
    elif task.pgid == task.pid:
        t.syscall("setpgid", 0, 0)


def restore_rlimits(pid: int, limits: list[Rlimit]) -> list[str]:
    """Set the saved limits from outside; returns warnings for ones we could not raise."""
    warnings = []
    for r in limits:
        want = (_py_rl(r.soft), _py_rl(r.hard))
        try:
            resource.prlimit(pid, r.resource, want)
        except PermissionError:
            cur_hard = resource.prlimit(pid, r.resource)[1]
            soft = want[0] if cur_hard == resource.RLIM_INFINITY or (
                want[0] != resource.RLIM_INFINITY and want[0] <= cur_hard) else cur_hard
            resource.prlimit(pid, r.resource, (soft, cur_hard))
            warnings.append(f"rlimit {r.resource}: hard limit could not be raised to {r.hard} "
                            f"(needs CAP_SYS_RESOURCE); kept {cur_hard}")
        except (ValueError, OSError) as e:
            raise RestoreError(f"cannot set resource limit {r.resource}: {e}") from None
    return warnings


_CAP_HEADER = struct.Struct("<Ii")        # version, pid
_CAP_DATA = struct.Struct("<IIIIII")       # 2 x (effective, permitted, inheritable)
CAP_V3 = 0x20080522


def restore_caps(t: Tracee, arena: Arena, caps: list[int], current: tuple[int, int, int]) -> None:
    """Drop to the saved capability sets.  A task restored in a user namespace
    of ours starts with every capability there; the program had fewer."""
    if len(caps) < 3:
        return
    inh, prm, eff = caps[:3]
    if (inh, prm, eff) == current:
        return
    lo = lambda v: v & 0xFFFFFFFF   # noqa: E731
    hi = lambda v: v >> 32          # noqa: E731
    data = _CAP_DATA.pack(lo(eff), lo(prm), lo(inh), hi(eff), hi(prm), hi(inh))
    try:
        t.syscall("capset", arena.put(_CAP_HEADER.pack(CAP_V3, 0)), arena.put(data))
    except OSError as e:
        raise RestoreError(f"cannot set the saved capabilities: {e.strerror}") from None


def restore_creds(t: Tracee, arena: Arena, creds: Creds) -> None:
    """Become the saved user (only reached as root, see check_creds)."""
    if os.geteuid() != 0:
        return
    if creds.uid == [0, 0, 0, 0] and creds.gid == [0, 0, 0, 0] and not creds.groups:
        return
    try:
        groups = b"".join(g.to_bytes(4, "little") for g in creds.groups)
        t.syscall("setgroups", len(creds.groups), arena.put(groups) if groups else 0)
        t.syscall("setresgid", *creds.gid[:3])
        t.syscall("setresuid", *creds.uid[:3])
    except OSError as e:
        raise PermissionDenied(f"cannot take the saved identity uid {creds.uid[0]}: {e.strerror}") from None
