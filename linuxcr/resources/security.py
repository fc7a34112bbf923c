"""Security state of each thread: seccomp (strict mode, or BPF filters in
the order they were installed, with their flags), no_new_privs,
securebits, and all five capability sets (effective, permitted,
inheritable, bounding, ambient).

Dump: the filters come from PTRACE_SECCOMP_GET_FILTER, which needs
CAP_SYS_ADMIN: without it a seccomp'd process is refused by `lcr check`.
lcr's own injected syscalls are kept out of the filters' reach with
PTRACE_O_SUSPEND_SECCOMP (remote/task.py), at dump and at restore.

Restore, per thread, in this order:
- restore_early (the task is still privileged, before its identity): drop
  the bounding set, securebits, no_new_privs, then the seccomp filters
  (installing one needs no_new_privs or CAP_SYS_ADMIN, which the task may
  not hold once it is itself again).  The filters judge nothing lcr
  injects afterwards (suspended), only the program once lcr lets it go;
- restore_identity (other threads; the engine does the leader): uid/gid
  and the effective/permitted/inheritable sets -- setresuid() changes only
  the calling thread's credentials;
- restore_ambient last: leaving uid 0 clears the ambient set."""
from __future__ import annotations

import os

from linuxcr.errors import RestoreError
from linuxcr.image.schema import Creds, SeccompFilter, ThreadAttrs
from linuxcr.procfs import ProcStatus, read_cap_last_cap, read_stat, read_status, thread_tids
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import process
from linuxcr.sys import ptrace

SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
CAP_SYS_ADMIN = 21


def _thread_status(pid: int, tid: int) -> ProcStatus:
    return read_status(pid if tid == pid else f"{pid}/task/{tid}")


def _can_read_filters() -> bool:
    return bool(read_status(os.getpid()).cap_eff >> CAP_SYS_ADMIN & 1)


def _descends_from_us(pid: int) -> bool:
    me, p, seen = os.getpid(), pid, 0
    while p > 1 and seen < 4096:
        try:
            p = read_stat(p).ppid
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return False
        if p == me:
            return True
        seen += 1
    return False


def inherited_from_us(pid: int, st: ProcStatus) -> bool:
    """The thread's seccomp filters are exactly lcr's own: it descends from
    lcr (which never adds a filter) and has as many filters as lcr, so it
    added none (filters are only ever added).  The case of a container whose
    runtime put every process, lcr included, under its profile."""
    if st.seccomp != SECCOMP_MODE_FILTER or not st.seccomp_filters:
        return False
    mine = read_status(os.getpid())
    return mine.seccomp == SECCOMP_MODE_FILTER and mine.seccomp_filters == st.seccomp_filters \
        and _descends_from_us(pid)


def check(pid: int) -> list[str]:
    """Seccomp without CAP_SYS_ADMIN; threads with credentials of their own."""
    out = []
    try:
        tids = thread_tids(pid)
        leader = read_status(pid)
    except (FileNotFoundError, ProcessLookupError):
        return []
    admin = None
    for tid in tids:
        try:
            st = _thread_status(pid, tid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        who = f"thread {tid}" if tid != pid else f"pid {pid}"
        if st.seccomp and not inherited_from_us(pid, st):
            admin = _can_read_filters() if admin is None else admin
            if not admin:
                mode = "strict mode" if st.seccomp == SECCOMP_MODE_STRICT else "a filter"
                out.append(f"{who} runs under seccomp ({mode}): reading its filters needs "
                           "CAP_SYS_ADMIN (PTRACE_SECCOMP_GET_FILTER); checkpoint it as root")
                break
        if (st.uid, st.gid, st.groups) != (leader.uid, leader.gid, leader.groups):
            out.append(f"{who} has credentials of its own (uid {'/'.join(map(str, st.uid))}): "
                       "not supported (threads share the leader's)")
    return out


def _filters(tid: int) -> list[SeccompFilter]:
    """Every filter of the thread, oldest first (index 0 is the newest)."""
    out = []
    i = 0
    while (prog := ptrace.seccomp_filter(tid, i)) is not None:
        out.append(SeccompFilter(prog=prog, flags=ptrace.seccomp_metadata(tid, i)))
        i += 1
    return out[::-1]


def dump(pid: int, t: Tracee) -> dict:
    """The thread's security state, as ThreadAttrs fields; ``t`` frozen."""
    st = _thread_status(pid, t.pid)
    if inherited_from_us(pid, st):
        return dict(no_new_privs=bool(st.no_new_privs),
                    securebits=t.syscall("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0),
                    caps=[st.cap_inh, st.cap_prm, st.cap_eff, st.cap_bnd, st.cap_amb],
                    seccomp_mode=0, seccomp=[], seccomp_inherited=st.seccomp_filters)
    try:
        filters = _filters(t.pid) if st.seccomp == SECCOMP_MODE_FILTER else []
    except OSError as e:
        from linuxcr.errors import PermissionDenied
        raise PermissionDenied(f"tid {t.pid}: cannot read its seccomp filters: {e.strerror}",
                               "checkpoint it as root (CAP_SYS_ADMIN)") from None
    return dict(no_new_privs=bool(st.no_new_privs),
                securebits=t.syscall("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0),
                caps=[st.cap_inh, st.cap_prm, st.cap_eff, st.cap_bnd, st.cap_amb],
                seccomp_mode=st.seccomp, seccomp=filters)


def restore_early(t: Tracee, arena: Arena, a: ThreadAttrs | None) -> None:
    """Bounding set, securebits, no_new_privs, seccomp: while still privileged."""
    if a is None:
        return
    st = read_status(t.pid)
    if a.seccomp_inherited and (st.seccomp != SECCOMP_MODE_FILTER
                                or st.seccomp_filters != a.seccomp_inherited):
        # the task was forked from this lcr: it has lcr's filters, no others
        raise RestoreError(f"tid {t.pid} ran under {a.seccomp_inherited} seccomp filter(s) it "
                           f"shared with the lcr that saved it (a container's profile); this lcr "
                           f"runs under {st.seccomp_filters}: it would run with other sandboxing",
                           "restart it under the same seccomp profile (the same container "
                           "runtime options)")
    what = f"tid {t.pid}"
    try:
        if len(a.caps) == 5:
            for cap in range(read_cap_last_cap() + 1):
                if st.cap_bnd >> cap & 1 and not a.caps[3] >> cap & 1:
                    what = f"tid {t.pid}: dropping capability {cap} from its bounding set"
                    t.syscall("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
        if a.securebits != t.syscall("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0):
            what = f"tid {t.pid}: setting its securebits 0x{a.securebits:x}"
            t.syscall("prctl", PR_SET_SECUREBITS, a.securebits, 0, 0, 0)
        if a.no_new_privs:
            t.syscall("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if a.seccomp_mode:
            what = f"tid {t.pid}: installing its seccomp filters"
            t.suspend_seccomp()      # from here on they would judge our own syscalls
            if a.seccomp_mode == SECCOMP_MODE_STRICT:
                t.syscall("seccomp", SECCOMP_SET_MODE_STRICT, 0, 0)
            for f in a.seccomp:
                arena.reset()
                prog = arena.put(f.prog)
                fprog = arena.put((len(f.prog) // 8).to_bytes(8, "little") + prog.to_bytes(8, "little"))
                t.syscall("seccomp", SECCOMP_SET_MODE_FILTER, f.flags, fprog)
    except OSError as e:
        raise RestoreError(f"{what}: {e.strerror}", "restart as root") from None


SECBIT_LOCKS = 0xAAA            # every *_LOCKED bit: the odd ones (a lock follows its bit)
CAP_SETPCAP = 8


def securebits(t: Tracee) -> int:
    return t.syscall("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0)


def securebits_stuck(t: Tracee, saved: int) -> str:
    """Rollback: why the thread's securebits, changed since, cannot be set
    back to ``saved`` ("" if they are the same or can be): a lock bit set
    since (locks cannot be cleared) or a bit changed under its lock; or no
    CAP_SETPCAP to change them."""
    now = securebits(t)
    if now == saved:
        return ""
    diff = now ^ saved
    stuck = diff & now & SECBIT_LOCKS | (diff & ~SECBIT_LOCKS & (now & SECBIT_LOCKS) >> 1)
    if stuck:
        return (f"securebits (0x{now:x} now, 0x{saved:x} at the snapshot: locked since, "
                "locks cannot be cleared)")
    if not read_status(t.pid).cap_eff >> CAP_SETPCAP & 1:
        return (f"securebits (0x{now:x} now, 0x{saved:x} at the snapshot: setting them needs "
                "CAP_SETPCAP, which it lacks)")
    return ""


def roll_back_securebits(t: Tracee, a: ThreadAttrs | None) -> None:
    """A live thread's securebits as saved (securebits_stuck said they can be)."""
    if a is not None and securebits(t) != a.securebits:
        try:
            t.syscall("prctl", PR_SET_SECUREBITS, a.securebits, 0, 0, 0)
        except OSError as e:
            raise RestoreError(f"tid {t.pid}: securebits 0x{a.securebits:x} not rolled back: "
                               f"{e.strerror}") from None


def restore_identity(t: Tracee, arena: Arena, creds: Creds, a: ThreadAttrs | None) -> None:
    """A thread other than the leader: the process's identity, its own capabilities."""
    process.restore_creds(t, arena, creds)
    if a is not None and len(a.caps) == 5:
        st = read_status(t.pid)
        process.restore_caps(t, arena, a.caps[:3], (st.cap_inh, st.cap_prm, st.cap_eff))
    restore_ambient(t, a)


def restore_ambient(t: Tracee, a: ThreadAttrs | None) -> None:
    """Last: setresuid() away from uid 0 clears the ambient set."""
    if a is None or len(a.caps) < 5 or not a.caps[4]:
        return
    have = read_status(t.pid).cap_amb
    for cap in range(64):
        if a.caps[4] >> cap & 1 and not have >> cap & 1:
            try:
                t.syscall("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)
            except OSError as e:
                raise RestoreError(f"tid {t.pid}: cannot raise ambient capability {cap}: "
                                   f"{e.strerror}") from None


def changed_since(pid: int, tid: int, a: ThreadAttrs | None, creds: Creds) -> list[str]:
    """What of thread ``tid`` of ``pid`` changed since its attributes ``a``
    and its process's credentials ``creds`` were saved (a snapshot) that a
    rollback cannot give back: seccomp filters added (they cannot be
    removed), no_new_privs set (it cannot be unset), credentials and
    capabilities (dropped ones cannot be regained; lcr never raises any)."""
    st = _thread_status(pid, tid)
    out = []
    if a is not None:
        had = len(a.seccomp) if a.seccomp_mode == 2 else a.seccomp_inherited
        if st.seccomp != (a.seccomp_mode or (2 if a.seccomp_inherited else 0)) or \
                (st.seccomp == 2 and st.seccomp_filters != had):
            out.append(f"seccomp (mode {st.seccomp}, {st.seccomp_filters} filter(s) now, "
                       f"{had} at the snapshot: filters cannot be removed)")
        if bool(st.no_new_privs) != a.no_new_privs:
            out.append("no_new_privs (set since the snapshot: it cannot be unset)")
        if len(a.caps) == 5:
            now = [st.cap_inh, st.cap_prm, st.cap_eff, st.cap_bnd, st.cap_amb]
            names = ("inheritable", "permitted", "effective", "bounding", "ambient")
            out += [f"{n} capabilities (0x{c:x} now, 0x{w:x} at the snapshot)"
                    for n, c, w in zip(names, now, a.caps) if c != w]
    if list(st.uid) != list(creds.uid):
        out.append(f"uid ({'/'.join(map(str, st.uid))} now, {'/'.join(map(str, creds.uid))} at the "
                   "snapshot)")
    if list(st.gid) != list(creds.gid):
        out.append(f"gid ({'/'.join(map(str, st.gid))} now, {'/'.join(map(str, creds.gid))} at the "
                   "snapshot)")
    if sorted(st.groups) != sorted(creds.groups):
        out.append("supplementary groups")
    return out
