"""The process tree: who is whose child, sessions and process groups,
zombies.

Restore builds the tree top-down before anything else is rebuilt: each blank
parent forks its children with an injected clone3() carrying the saved pid
(set_tid); a session leader calls setsid() before it forks, so its children
are born in its session; process groups are joined once everybody exists;
zombies are forked like the others and made to exit with their saved status.
"""
from __future__ import annotations

import ctypes
import os

from linuxcr.errors import LcrError, RestoreError
from linuxcr.image.schema import Task, Zombie
from linuxcr.procfs import read_stat, read_status
from linuxcr.remote.task import Arena, Tracee
from linuxcr.sys.syscalls import clone_args

SIGCHLD = 17


def children(pid: int) -> list[int]:
    """Children of every thread of pid."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):   # ESRCH: the thread exiting
                continue
    except (FileNotFoundError, ProcessLookupError):
        pass
    return sorted(set(out))


def tree_pids(root: int) -> list[int]:
    """root and its descendants now, breadth first (none that vanished)."""
    out, queue = [], [root]
    while queue:
        p = queue.pop(0)
        out.append(p)
        try:
            queue += children(p)
        except (OSError, LcrError):
            pass
    return out


def restore_mode(task: Task, any_pid: bool) -> str:
    """Where a saved tree whose root is ``task`` is born again:
    host: the saved pids in lcr's pid namespace (root) or any pids;
    ns-init: a new pid namespace whose pid 1 is the root (`lcr run` trees);
    ns: a new pid namespace (and user namespace) with the saved pids inside.
    A pure decision: the restore engine and the trust checks of
    resources/process.py both ask it."""
    if task.pidns_init:
        return "ns-init"
    if any_pid:
        return "host"
    if os.geteuid() == 0 and (task.vpid or task.pid) == task.pid:
        return "host"
    return "ns"


def is_zombie(pid: int) -> bool:
    try:
        return read_stat(pid).state in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


PR_SET_NAME = 15


def zombie(pid: int, parent: int) -> Zombie:
    st = read_stat(pid)
    try:
        status = read_status(pid)
        vpid, pgid, sid = status.ns_pid[-1], status.ns_pgid[-1], status.ns_sid[-1]
    except (FileNotFoundError, IndexError):
        vpid, pgid, sid = pid, 0, 0
    return Zombie(pid=pid, vpid=vpid, ppid=parent, status=st.exit_code & 0xFFFF,
                  pgid=pgid, sid=sid, comm=st.comm[:15])


def zombie_reasons(zombies: list[Zombie], tasks: list[tuple[int, int, int]]) -> list[str]:
    """A live process (pid, vpid, sid) in a session whose leader is now a
    zombie: its session can only be inherited through the leader, which a
    restore does not fork processes from."""
    leaders = {z.vpid: z for z in zombies if z.sid == z.vpid}
    return [f"pid {pid} is in session {sid}, whose leader (pid {leaders[sid].pid}) is a zombie: "
            "not supported" for pid, vpid, sid in tasks if sid in leaders and vpid != sid]


def make_zombies(zs: list[tuple[Tracee, Zombie]], scratch: list[int]) -> None:
    """Forked zombies-to-be (before set_groups): their names; session
    leaders become so first, so that the others can join their groups.
    ``scratch``: for each, an address of writable scratch it inherited
    from its parent.  One ended by a signal gets that signal's default
    action (Tracee.exit_now sends it)."""
    for (t, z), at in zip(zs, scratch):
        if z.comm:
            t.write(at, z.comm.encode(errors="surrogateescape")[:15] + b"\0")
            t.syscall("prctl", PR_SET_NAME, at)
        if z.sid and z.sid == z.vpid:
            t.syscall("setsid")
        sig = z.status & 0x7F
        if sig:     # the default action, for exit_now's tkill: the blank has lcr's
            # (Python catches SIGINT and SIGTERM: a handler address that is
            # nothing in the blank; it ignores SIGPIPE: the task would not die)
            t.write(at, bytes(32))                       # struct k_sigaction, SIG_DFL
            t.syscall("rt_sigaction", sig, at, 0, 8)


CLONE_FILES = 0x400


def _with_mm(pids: list[int]) -> list[int]:
    """pids that still have an address space and fd table: kcmp finds two
    exiting or zombie processes (both without) "the same"."""
    out = []
    for p in pids:
        try:
            if read_stat(p).state not in ("Z", "X", "x"):
                out.append(p)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


def files_sharing(pids: list[int]) -> dict[int, int]:
    """Processes (not threads) that share an fd table (clone(CLONE_FILES)):
    pid -> the first pid of ``pids`` (tree order) whose table it shares."""
    from linuxcr.sys.syscalls import KCMP_FILES, kcmp_same
    pids = _with_mm(pids)
    out: dict[int, int] = {}
    for i, b in enumerate(pids):
        for a in pids[:i]:
            if a not in out and kcmp_same(KCMP_FILES, a, b):
                out[b] = a
                break
    return out


def sharing_reasons(pids: list[int], parent: dict[int, int] | None = None) -> list[str]:
    """Processes (not threads) that share an address space (vfork), or an fd
    table in a way the restore cannot build again: a process is forked with
    CLONE_FILES from its parent, so the parent must share that table too.
    ``parent``: pid -> ppid (read from /proc where missing)."""
    from linuxcr.sys.syscalls import KCMP_VM, kcmp_same
    pids = _with_mm(pids)
    out = []
    for i, a in enumerate(pids):
        for b in pids[i + 1:]:
            if kcmp_same(KCMP_VM, a, b):
                out.append(f"pid {b} shares its memory with pid {a} (vfork or CLONE_VM): "
                           "not supported; try again once it has called exec")
    sharing = files_sharing(pids)
    for b, a in sharing.items():
        pp = (parent or {}).get(b) or read_stat(b).ppid
        if pp != a and sharing.get(pp) != a:
            out.append(f"pid {b} shares its fd table with pid {a} (CLONE_FILES) but its parent "
                       f"pid {pp} does not: not supported (only a table shared with the parent "
                       "can be rebuilt)")
    return out


def clone_flags(task: Task) -> int:
    """What the task is forked with at restore: CLONE_FILES when it shares
    its parent's fd table (Task.files_with; checked by restore's validate_tree)."""
    return CLONE_FILES if task.files_with is not None else 0


def fork_child(parent: Tracee, arena: Arena, vpid: int | None, flags: int = 0) -> Tracee:
    """A new process forked by the (blank, stopped) parent, with pid vpid
    and clone ``flags`` (CLONE_FILES: see clone_flags)."""
    args = clone_args()
    args.flags = flags
    args.exit_signal = SIGCHLD
    if vpid is not None:
        tid = (ctypes.c_int32 * 1)(vpid)
        args.set_tid, args.set_tid_size = arena.put(bytes(tid)), 1
    try:
        pid = parent.clone(arena.put(bytes(args)), ctypes.sizeof(args))
    except OSError as e:
        raise RestoreError(f"cannot create pid {vpid}: {e.strerror}",
                           "it may be in use; restart with --any-pid") from None
    child = Tracee(pid, exitkill=True, traceclone=True)
    child.attached = True
    from linuxcr.sys import ptrace
    child.saved_regs = ptrace.get_regs(pid)
    child.insn = parent.insn
    return child


def set_session(t: Tracee, task: Task) -> None:
    """Right after the blank is made, before it forks: session leaders."""
    vpid = task.vpid or task.pid
    if task.sid == vpid:
        t.syscall("setsid")


def roll_back_group(t: Tracee, task: Task) -> str | None:
    """A live task (rollback) back in its saved process group, if it moved
    to another one of its session since (setpgid); why not, or None."""
    if not task.pgid or read_status(t.pid).ns_pgid[-1:] == (task.pgid,):
        return None
    try:
        t.syscall("setpgid", 0, task.pgid)
    except OSError as e:
        return (f"pid {task.vpid or task.pid}: process group {task.pgid} not rolled back "
                f"({e.strerror}): it stays in group {read_status(t.pid).ns_pgid[-1]}")
    return None


def set_groups(made: list[tuple[Tracee, Task]]) -> None:
    """Once every task exists: group leaders first, then members join."""
    def vp(task: Task) -> int:
        return task.vpid or task.pid
    made = [(t, k) for t, k in made if k.pgid]    # (zombies of older images: left as forked)
    leaders = [(t, k) for t, k in made if k.pgid == vp(k) and k.sid != vp(k)]
    members = [(t, k) for t, k in made if k.pgid != vp(k)]
    for t, k in leaders + members:
        if t.syscall("getpgid", 0) == k.pgid:
            continue
        try:
            t.syscall("setpgid", 0, k.pgid)
        except OSError as e:
            raise RestoreError(f"pid {vp(k)}: cannot join process group {k.pgid}: {e.strerror}") from None
