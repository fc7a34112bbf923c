"""What a process is besides memory, CPU and files: identity (creds,
session), limits, umask, personality, name, and the mm fields that tell the
kernel where code, heap, arguments, environment and auxv live."""
from __future__ import annotations

import os
import resource
import stat
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import msgspec

from linuxcr.errors import LcrError, PermissionDenied, RestoreError
from linuxcr.image.schema import Creds, MmFields, RecType, Rlimit, Task, Tree
from linuxcr.image.source import Source
from linuxcr.procfs.limits import read_limits
from linuxcr.procfs import ProcStat, ProcStatus, read_auxv, read_stat, read_status
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import pstree
from linuxcr.sys.syscalls import get_robust_list

PR_SET_NAME = 15
PR_SET_KEEPCAPS = 8
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
    try:
        for res in range(RLIM_NLIMITS):
            soft, hard = resource.prlimit(pid, res)
            out.append(Rlimit(resource=res, soft=_rl(soft), hard=_rl(hard)))
    except PermissionError:
        # prlimit() of another user's process needs CAP_SYS_RESOURCE (which
        # root may lack); /proc/PID/limits says the same to whoever may read it
        return _rlimits_from_proc(pid)
    return out


def _rlimits_from_proc(pid: int) -> list[Rlimit]:
    limits = read_limits(pid, unlimited=RLIM_INF)[:RLIM_NLIMITS]
    return [Rlimit(resource=res, soft=soft, hard=hard) for res, (soft, hard) in enumerate(limits)]


def dump_mm(pid: int, stat: ProcStat, brk: int) -> MmFields:
    return MmFields(
        start_code=stat.start_code, end_code=stat.end_code, start_data=stat.start_data,
        end_data=stat.end_data, start_brk=stat.start_brk, brk=brk, start_stack=stat.start_stack,
        arg_start=stat.arg_start, arg_end=stat.arg_end, env_start=stat.env_start,
        env_end=stat.env_end, auxv=read_auxv(pid), exe=os.readlink(f"/proc/{pid}/exe"))


def mm_changed(pid: int, saved: MmFields, brk: int) -> bool:
    """Do the mm fields of the live process (its break ``brk``) differ from
    ``saved`` (the executable's path aside)?"""
    now = dump_mm(pid, read_stat(pid), brk)
    return msgspec.structs.replace(now, exe=saved.exe) != saved


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

# --- who may restore what (check_creds, --trust) -------------------------------
#
# A restart never gives the restored process more than the caller has:
# - a non-root caller restores only its own identity (uids, gids); never
#   capabilities it does not hold itself, except inside the user namespace
#   a rootless restart creates (which the caller owns; restore_caps drops
#   the task to its saved sets there); never a set-uid/set-gid/file-caps
#   program; and files are opened by lcr as the caller, so the kernel
#   refuses what the caller could not open;
# - root restores what the image asks only with --trust naming it, when the
#   image would grant something: "uid" (the tasks run as another identity
#   than the caller's, or the image's bytes could have been written by
#   someone else than root: image/source.py decides, for the image and each
#   of its parents, and a good --verify signature stands for root), "caps"
#   (capabilities held under such an identity), "setuid" (such a task runs
#   a set-uid, set-gid or file-capability program), "files" (such a task
#   would get files, mappings, cwd or root its identity could not open).

TRUST_KINDS = ("uid", "caps", "setuid", "files")
CAP_NAMES = ("chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap "
             "linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock "
             "ipc_owner sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot "
             "sys_nice sys_resource sys_time sys_tty_config mknod lease audit_write "
             "audit_control setfcap mac_override mac_admin syslog wake_alarm block_suspend "
             "audit_read perfmon bpf checkpoint_restore").split()


def parse_trust(values) -> frozenset[str]:
    """--trust uid,caps --trust files -> {"uid", "caps", "files"}; "all" is every kind."""
    if isinstance(values, str):
        values = [values]
    out: set[str] = set()
    for v in values or ():
        for name in filter(None, (x.strip().lower() for x in str(v).split(","))):
            if name == "all":
                out.update(TRUST_KINDS)
            elif name in TRUST_KINDS:
                out.add(name)
            else:
                raise LcrError(f"--trust {name}: unknown; give one or more of "
                               f"{', '.join(TRUST_KINDS)}, all")
    return frozenset(out)


@dataclass
class RestorePolicy:
    """What one restart may grant; api.py sets it around restore.restart()."""
    trust: frozenset[str] = frozenset()
    any_pid: bool = False
    # Who could have written the image and its parents (image/files.py
    # reports each as it is opened).  None: the caller vouches for the stream
    # itself (the migration receiver, after authenticating its peer).
    sources: list[Source] | None = None
    verified: bool = False              # every image read carried a good --verify signature
    image_name: str = "image"
    tree: Tree | None = None            # seen by the image reader (observe)
    tasks: list[Task] = field(default_factory=list)
    checked: bool = False
    _headers: int = 0

    def observe(self, rtype: RecType, meta) -> None:
        """The metadata of the image itself (the first one read), not of its
        parents: only its tasks are restored."""
        if rtype is RecType.HEADER:
            self._headers += 1
        elif self._headers > 1:
            return
        elif rtype is RecType.TREE:
            self.tree = meta
        elif rtype is RecType.TASK:
            self.tasks.append(meta)

    def add_source(self, src: Source) -> None:
        if self.sources is None:
            self.sources = []
        self.sources.append(src)

    def untrusted_source(self, uid: int) -> str:
        """Why ``uid`` cannot take the image's bytes as its own ("" if it can)."""
        if self.verified or self.sources is None:
            return ""
        return next((s.why_not(uid) for s in self.sources if not s.trusted_by(uid)), "")


_POLICY: ContextVar[RestorePolicy | None] = ContextVar("linuxcr_restore_policy", default=None)


@contextmanager
def restore_policy(policy: RestorePolicy) -> Iterator[RestorePolicy]:
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


@dataclass(frozen=True)
class Grant:
    kind: str        # one of TRUST_KINDS
    what: str


def cap_names(mask: int) -> str:
    names = [("cap_" + CAP_NAMES[i]) if i < len(CAP_NAMES) else f"cap_{i}"
             for i in range(64) if mask >> i & 1]
    if len(names) > 6:
        return f"{len(names)} capabilities ({', '.join(names[:4])}, ...)"
    return ", ".join(names)


def _task_caps(task: Task) -> int:
    """Every capability the saved task can use: inheritable, permitted,
    effective, ambient (not the bounding set: a limit, not a power)."""
    caps = list(task.caps) + [0] * (5 - len(task.caps))
    return caps[0] | caps[1] | caps[2] | caps[4]


def _privileged_exe(task: Task) -> str | None:
    """'set-uid' / 'set-gid' / 'file-capability' if the task's program is one
    here that gives more than the task's own (real) user and group."""
    path = task.mm.exe
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if st.st_mode & stat.S_ISUID and st.st_uid != task.creds.uid[0]:
        return "set-uid"
    if st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP and st.st_gid != task.creds.gid[0]:
        return "set-gid"
    try:
        os.getxattr(path, "security.capability")
        return "file-capability"
    except (OSError, ValueError):
        return None


def _ident(task: Task) -> str:
    uids, gids = sorted(set(task.creds.uid)), sorted(set(task.creds.gid))
    return f"uid {'/'.join(map(str, uids))} gid {'/'.join(map(str, gids))}"


def check_creds(task: Task) -> str | None:
    """Refuse, before anything is made, a task the caller may not restore.

    Non-root: returns the reason (the caller raises RestoreError).  Root:
    raises PermissionDenied listing what the image would be granted beyond
    what --trust allows (the whole tree at once when the reader reported it)."""
    policy = _POLICY.get() or RestorePolicy()
    if os.geteuid() != 0:
        return _check_unprivileged(task, policy)
    if policy.checked:
        return None
    tasks = [task]
    if any(k is task for k in policy.tasks):
        tasks = policy.tasks
        policy.checked = True
    grants = root_grants(tasks, policy)
    missing = [g for g in grants if g.kind not in policy.trust]
    if missing:
        kinds = sorted({g.kind for g in missing}, key=TRUST_KINDS.index)
        whats = "; ".join(g.what for g in missing[:6]) + ("; ..." if len(missing) > 6 else "")
        how = f"if you trust this image, restart with --trust {','.join(kinds)}"
        if policy.untrusted_source(0) and not policy.verified:
            how = f"if you trust this image, give --verify KEYFILE of its signer, or --trust {','.join(kinds)}"
        raise PermissionDenied(f"restoring {policy.image_name} would grant: {whats}", how)
    return None


def _check_unprivileged(task: Task, policy: RestorePolicy) -> str | None:
    me = os.geteuid()
    if set(task.creds.uid) != {me} or set(task.creds.gid) != {os.getegid()}:
        return (f"the image's process ran as {_ident(task)}; you are uid {me}: only root "
                "can restore another user's process")
    kind = _privileged_exe(task)
    if kind:
        return (f"pid {task.pid} ran the {kind} program {task.mm.exe}: only root can restore "
                "it (with --trust setuid)")
    # In a new user namespace (the rootless default) the task's capabilities
    # are confined to that namespace, which the caller owns.  In the caller's
    # own namespace (--any-pid) it may get no capability the caller lacks.
    if pstree.restore_mode(task, policy.any_pid) == "host":
        mine = read_status(os.getpid())
        extra = _task_caps(task) & ~(mine.cap_prm | mine.cap_inh)
        if extra:
            return (f"pid {task.pid} held capabilities you do not have ({cap_names(extra)}); "
                    "restart without --any-pid (into a user namespace of yours), or as root")
    return None


def root_grants(tasks: list[Task], policy: RestorePolicy) -> list[Grant]:
    """What restoring ``tasks`` as root would grant (see the comment above)."""
    me, my_gid = os.geteuid(), os.getegid()
    foreign = policy.untrusted_source(me)
    out: list[Grant] = []
    check_files: dict[tuple, list[tuple[str, int, str, int]]] = {}
    for k in tasks:
        own = set(k.creds.uid) == {me} and set(k.creds.gid) == {my_gid}
        if own and not foreign:
            continue
        if not own:
            out.append(Grant("uid", f"pid {k.pid} runs as {_ident(k)}"))
        else:
            out.append(Grant("uid", f"pid {k.pid} runs as {_ident(k)} (yours) from an image "
                                    f"root did not provably write: {foreign}"))
        caps = _task_caps(k)
        if caps:
            out.append(Grant("caps", f"pid {k.pid} holds {cap_names(caps)}"))
        kind = _privileged_exe(k)
        if kind:
            out.append(Grant("setuid", f"pid {k.pid} runs the {kind} program {k.mm.exe}"))
        fsuid, fsgid = k.creds.uid[3], k.creds.gid[3]
        if fsuid != 0:
            ident = (fsuid, fsgid, tuple(sorted(set(k.creds.groups))))
            check_files.setdefault(ident, []).extend(
                (p, mode, what, k.pid) for p, mode, what in _paths_opened(k, policy.tree))
    for ident, paths in check_files.items():
        out += _files_beyond(ident, paths)
    return out


def _access_mode(flags: int) -> int:
    if flags & os.O_PATH:
        return os.F_OK
    acc = flags & os.O_ACCMODE
    return os.R_OK if acc == os.O_RDONLY else os.W_OK if acc == os.O_WRONLY else os.R_OK | os.W_OK


def _paths_opened(task: Task, tree: Tree | None) -> list[tuple[str, int, str]]:
    """(path, access mode, what) of everything restore opens for the task."""
    out = [(task.mm.exe, os.X_OK, "its program"), (task.cwd, os.X_OK, "its working directory"),
           (task.root, os.X_OK, "its root directory")]
    for v in task.vmas:
        if v.kind == "file" and v.path.startswith("/"):
            rw = v.shared and "mw" in v.vmflags
            out.append((v.path, os.R_OK | (os.W_OK if rw else 0), f"mapping 0x{v.start:x}"))
    if tree is not None:
        descs = {d.fid: d for d in tree.files}
        for f in task.files:
            d = descs.get(f.fid)
            if d is None:
                continue
            if d.kind in ("reg", "dir", "chr", "fifo") and d.path.startswith("/"):
                out.append((d.path, _access_mode(d.flags), f"fd {f.fd}"))
            for w in getattr(d.state, "watches", None) or ():
                path = getattr(w, "path", "")
                if isinstance(path, str) and path.startswith("/"):
                    out.append((path, os.R_OK, f"fd {f.fd} (inotify watch)"))
    return out


_MODES = {os.R_OK: "read", os.W_OK: "write", os.R_OK | os.W_OK: "read and write",
          os.X_OK: "use", os.F_OK: "reach"}


def _files_beyond(ident: tuple, paths: list[tuple[str, int, str, int]]) -> list[Grant]:
    """The paths ``ident`` (fsuid, fsgid, groups) could not open, asked of the
    kernel itself (modes, ACLs, security modules) by a child of ours that
    becomes that identity and calls access()."""
    uid, gid, groups = ident
    uniq = sorted({(p, m) for p, m, _, _ in paths})
    r, w = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover - runs in the child
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            bad = [str(i) for i, (p, m) in enumerate(uniq)
                   if "\0" in p or not os.access(p, m)]
            os.write(w, ("ok\n" + "\n".join(bad)).encode())
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(child, 0)
    lines = b"".join(chunks).decode().split("\n")
    if lines[0] != "ok":
        return [Grant("files", f"files of uid {uid}: cannot check which ones it could open "
                               f"(as uid {uid} gid {gid} with {len(groups)} groups)")]
    bad = {uniq[int(i)] for i in lines[1:] if i}
    out = []
    for p, m, what, pid in paths:
        if (p, m) in bad:
            out.append(Grant("files", f"pid {pid} {what}: {p}, which uid {uid} may not "
                                      f"{_MODES.get(m, 'open')}"))
    return out


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
    """Independent calls: one resume in a blank (Tracee.batch)."""
    calls = [("umask", (task.umask,), True), ("personality", (task.personality,), True),
             ("prctl", (PR_SET_NAME, arena.cstr(task.comm[:15])), True)]
    if task.robust_list[0]:
        calls.append(("set_robust_list", (task.robust_list[0], task.robust_list[1]), True))
    calls.append(("set_tid_address", (task.tid_address,), True))
    t.batch(calls)


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
    of ours starts with every capability there; the program had fewer.  A
    task root made another user keeps root's permitted set only when caps
    are trusted (restore_creds): it must end here with exactly its own."""
    if len(caps) < 3:   # an image without capabilities: none, unless it is root
        if current == (0, 0, 0) or read_status(t.pid).uid[1] == 0:
            return
        caps = [0, 0, 0]
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
    # Leaving uid 0 clears the capabilities; when they are trusted the task
    # keeps its permitted set across setresuid so that restore_caps (always
    # next) can give it back exactly the saved sets.
    policy = _POLICY.get()
    keep = policy is not None and "caps" in policy.trust
    try:
        groups = b"".join(g.to_bytes(4, "little") for g in creds.groups)
        t.syscall("setgroups", len(creds.groups), arena.put(groups) if groups else 0)
        t.syscall("setresgid", *creds.gid[:3])
        if keep:
            t.syscall("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0)
        t.syscall("setresuid", *creds.uid[:3])
        if keep:
            t.syscall("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0)
    except OSError as e:
        raise PermissionDenied(f"cannot take the saved identity uid {creds.uid[0]}: {e.strerror}") from None
