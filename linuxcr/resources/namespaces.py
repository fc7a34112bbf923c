"""Namespaces of a tree's own (`lcr run --ipc --uts --net --mount`): which
ones, what they hold that lcr gives back (the hostname), and running a
function inside a process's namespaces (resources/sysvipc.py reads and makes
its objects so).

Made again on restart: the blank's namespaces are unshared with these kinds
(engine/spawn.py), then ``restore`` sets what they hold before any task runs.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import socket
import stat
from typing import Any, Callable

from linuxcr.errors import NotCheckpointable, RestoreError
from linuxcr.image.schema import FileDesc, MountRec, Namespaces, Task, TmpFile
from linuxcr.procfs import fd_links, read_status
from linuxcr.procfs.mounts import Mount, read_mountinfo
from linuxcr.resources import pstree
from linuxcr.sys import ipc, sockdiag
from linuxcr.sys.nshelper import NsHelper

KINDS = ("ipc", "uts", "net", "mnt")
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x40000000
FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET, "mnt": CLONE_NEWNS}


def _ino(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def own(pid: int) -> list[str]:
    """The kinds of namespace ``pid`` does not share with lcr."""
    return [k for k in KINDS if _ino(pid, k) != _ino("self", k)]


def own_ipc(pid: int, root_is_init: bool) -> bool:
    """Has the tree rooted at ``pid`` an ipc namespace of its own that lcr
    makes again (an `lcr run --ipc` tree, whose root is the init of its pid
    namespace)?  Then every System V object there is the tree's
    (resources/sysvipc.py), not only those it has attached."""
    return bool(root_is_init) and "ipc" in own(pid)


# every namespace a task is in or gives its children, as /proc/PID/ns names them
TASK_KINDS = ("mnt", "uts", "ipc", "net", "user", "cgroup", "time", "pid_for_children",
              "time_for_children")


def task_inodes(pid: int, tid: int) -> dict[str, int]:
    """kind -> inode of the namespaces of thread ``tid`` of ``pid`` (those it can read)."""
    out = {}
    for k in TASK_KINDS:
        try:
            out[k] = os.stat(f"/proc/{pid}/task/{tid}/ns/{k}").st_ino
        except OSError:
            pass
    return out


def moved(pid: int, tid: int, was: dict[str, int]) -> list[str]:
    """The kinds of namespace thread ``tid`` left since ``was`` (task_inodes)
    was read: unshare() and setns() cannot be undone from outside."""
    now = task_inodes(pid, tid)
    return [k for k, ino in was.items() if k in now and now[k] != ino]


def check(pid: int, root: int, root_is_init: bool) -> list[str]:
    """A process whose namespaces lcr cannot make again: one of the tree
    (not its root) in other namespaces than the root's; in the mount
    namespace of an `lcr run --mount` tree, a mount of a kind lcr does not
    make again.  (A root that is not the init of an `lcr run` tree comes
    back in the namespaces of the lcr that restarts it, as when it moves
    to another machine: that is where lcr itself runs, e.g. `ip netns exec`.)"""
    if pid != root:
        diff = [k for k in KINDS if _ino(pid, k) != _ino(root, k)]
        return [f"it is in {'/'.join(diff)} namespaces other than its tree root's (pid {root}): "
                "not supported"] if diff else []
    if root_is_init and "mnt" in own(pid):
        return [f"{m.fstype} mounted on {m.point} in its mount namespace: {why}"
                for m, why in ((m, _unsupported(m)) for m in _mounts_made(pid)) if why]
    return []


def _mounts_made(pid: int) -> list[Mount]:
    """Mounts the tree sees that lcr does not (it made them, since its mount
    namespace began as a copy of lcr's)."""
    ours = {(m.point, m.root, m.dev) for m in read_mountinfo("self")}
    return [m for m in read_mountinfo(pid) if (m.point, m.root, m.dev) not in ours]


def _unsupported(m: Mount) -> str | None:
    if m.fstype == "tmpfs" and m.root == "/":
        return None
    if m.fstype in ("proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"):
        return f"only tmpfs and bind mounts are restored, not {m.fstype}"
    return None     # a bind mount: its source is found at dump (or refused there)


MAX_TMPFS = 16 << 20          # bytes of tmpfs content saved in all
MAX_TMPFS_FILES = 10000


def check_saved(ns: Namespaces | None, descs: list[FileDesc], tasks: list[Task]) -> list[str]:
    """What the tree holds that its namespaces make lcr unable to give
    back: anything opened or mapped under a mount it made (lcr opens files
    in its own mount namespace).  (Sockets of its own network namespace are
    made again there: see sockets_of and sockets_for.)"""
    if ns is None:
        return []
    out = []
    points = [m.point for m in ns.mounts]
    if points:
        def under(p: str) -> str | None:
            return next((pt for pt in points if p == pt or p.startswith(pt.rstrip("/") + "/")), None)
        used = [(d.path, f"an open file") for d in descs if d.path] + \
            [(t.cwd, f"pid {t.pid}'s working directory") for t in tasks] + \
            [(t.root, f"pid {t.pid}'s root") for t in tasks] + \
            [(t.mm.exe, f"pid {t.pid}'s program") for t in tasks] + \
            [(v.path, f"pid {t.pid}'s mapping 0x{v.start:x}") for t in tasks for v in t.vmas
             if v.kind == "file"]
        for path, what in used:
            pt = under(path)
            if pt:
                out.append(f"{what} {path} is under {pt}, a mount it made: lcr opens files in its "
                           "own mount namespace, so this is not restored yet")
                break
    return out


# --- sockets of a tree's own network namespace (`lcr run --net`) -------------

def own_net(root: int) -> bool:
    """Is ``root`` the init of an `lcr run --net` tree (a network namespace
    of its own, made again on restart)?"""
    try:
        st = read_status(root)
        return st.pidns_init and "net" in own(root)
    except (FileNotFoundError, ProcessLookupError):
        return False


@contextlib.contextmanager
def sockets_of(root: int):
    """While the block runs, socket facts (sock_diag) are read inside the
    network namespace of an `lcr run --net` tree rooted at ``root``, through
    a helper that lives there (sys/nshelper.py); elsewhere nothing changes."""
    if not own_net(root) or sockdiag.netns_ino() == _ino(root, "net"):
        yield
        return
    try:
        helper = NsHelper.join(root)
    except OSError as e:
        raise NotCheckpointable(root, [f"cannot enter its network namespace to read its "
                                       f"sockets: {e.strerror or e}"]) from None
    with helper, sockdiag.inside(helper):
        yield


def migrate_reasons(root: int) -> list[str]:
    """Migration does not make a tree's own network namespace again on the
    destination (only `lcr restart` does): a tree of `lcr run --net`
    holding a socket other than a UNIX socket pair is refused."""
    if not own_net(root):
        return []
    for pid in pstree.tree_pids(root):
        for fd, link in fd_links(pid):
            if not link.startswith("socket:"):
                continue
            try:
                with sockdiag.grab_socket(pid, fd) as s:
                    family = sockdiag.identity(s)[0]
                    named = family == socket.AF_UNIX and bool(s.getsockname())
            except OSError:
                continue
            if family != socket.AF_UNIX or named:
                return [f"pid {pid} fd {fd}: a socket in the tree's own network namespace: "
                        f"migration is {sockdiag.NOT_YET_NET}"]
    return []


def net_helper(ns: Namespaces | None) -> NsHelper | None:
    """For a restart: a fresh network namespace (loopback up; owned by a new
    user namespace when lcr is not root) the tree's sockets are made in
    (``sockdiag.inside``) and its blank joins (``NsHelper.ns_fds``); None
    if the tree has no network namespace of its own."""
    if ns is None or "net" not in ns.kinds:
        return None
    try:
        return NsHelper.fresh(user_ns=os.geteuid() != 0 or not _has_cap(CAP_SYS_ADMIN))
    except OSError as e:
        raise RestoreError(f"cannot make the network namespace of the restored tree: "
                           f"{e.strerror or e}", "unprivileged user namespaces may be "
                           "disabled") from None


CAP_SYS_ADMIN = 21


def _has_cap(cap: int) -> bool:
    return bool(read_status("self").cap_eff >> cap & 1)


def _mounts(pid: int) -> list[MountRec]:
    """The tree's own mounts as records: tmpfs with its files, bind mounts
    with the path (as lcr sees it) of what they bind."""
    made = _mounts_made(pid)
    ours = read_mountinfo("self")
    out: list[MountRec] = []
    total = [0]
    for m in made:
        flags = [f for f in m.options.split(",") if f in ipc.MOUNT_FLAGS]
        if m.fstype == "tmpfs" and m.root == "/":
            data = ",".join(o for o in m.super_options.split(",")
                            if o.split("=")[0] in ("size", "nr_inodes", "mode", "uid", "gid"))
            inner = [x.point for x in made if x is not m and x.point.startswith(m.point.rstrip("/") + "/")]
            out.append(MountRec(point=m.point, kind="tmpfs", flags=flags, data=data,
                                files=_tmpfs_files(pid, m.point, inner, total)))
            continue
        src = _bind_source(m, ours, made[:made.index(m)])
        if src is None:
            raise NotCheckpointable(pid, [f"{m.fstype} mounted on {m.point} in its mount namespace: "
                                          "only tmpfs and bind mounts of paths lcr sees are restored"])
        out.append(MountRec(point=m.point, kind="bind", source=src, flags=flags))
    return out


def _bind_source(m: Mount, ours: list[Mount], before: list[Mount]) -> str | None:
    """Where the bound directory or file is, as a path: under a mount of the
    same file system whose root holds it (lcr's, or one the tree made first)."""
    for o in list(reversed(before)) + ours:
        if o.dev != m.dev:
            continue
        r = o.root.rstrip("/")
        if m.root == o.root or m.root.startswith(r + "/") or r == "":
            rest = m.root[len(r):] if r else m.root
            return o.point.rstrip("/") + rest if rest else o.point
    return None


def _tmpfs_files(pid: int, point: str, skip: list[str], total: list[int]) -> list[TmpFile]:
    base = f"/proc/{pid}/root{point}"
    out: list[TmpFile] = []
    for d, dirs, files in os.walk(base):
        rel_d = os.path.relpath(d, base)
        dirs[:] = [x for x in dirs if os.path.join(point, rel_d, x).replace("/./", "/") not in skip]
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.normpath(os.path.join(rel_d, name))
            st = os.lstat(full)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) \
                else "file" if stat.S_ISREG(st.st_mode) else None
            if kind is None:
                raise NotCheckpointable(pid, [f"{point}/{rel} in a tmpfs it mounted is a special "
                                              "file: not restored"])
            data = b""
            if kind == "file":
                with open(full, "rb") as f:
                    data = f.read(MAX_TMPFS + 1)
            elif kind == "link":
                data = os.fsencode(os.readlink(full))
            total[0] += len(data)
            if total[0] > MAX_TMPFS or len(out) >= MAX_TMPFS_FILES:
                raise NotCheckpointable(pid, [f"the tmpfs it mounted on {point} holds more than "
                                              f"{MAX_TMPFS >> 20} MiB or {MAX_TMPFS_FILES} files"])
            out.append(TmpFile(path=rel, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                               gid=st.st_gid, data=data))
    return out


def _mount_all(mounts: list[MountRec]) -> None:
    """In the tree's new mount namespace: its mounts again, in order."""
    for m in mounts:
        flags = sum(ipc.MOUNT_FLAGS[f] for f in m.flags)
        if m.kind == "tmpfs":
            ipc.mount("tmpfs", m.point, "tmpfs", flags & ~ipc.MS_RDONLY, m.data)
            for f in m.files:
                _make_file(os.path.join(m.point, f.path), f)
            if flags & ipc.MS_RDONLY:
                ipc.mount("none", m.point, None, ipc.MS_REMOUNT | flags, m.data)
        else:
            ipc.mount(m.source, m.point, None, ipc.MS_BIND, None)
            if flags:
                ipc.mount("none", m.point, None, ipc.MS_REMOUNT | ipc.MS_BIND | flags, None)


def _make_file(path: str, f: TmpFile) -> None:
    if f.kind == "dir":
        os.mkdir(path, 0o700)
    elif f.kind == "link":
        os.symlink(os.fsdecode(f.data), path)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, f.data)
        finally:
            os.close(fd)
    with contextlib.suppress(PermissionError):
        os.lchown(path, f.uid, f.gid)
    if f.kind != "link":
        os.chmod(path, f.mode)


def dump(pid: int, root_is_init: bool) -> Namespaces | None:
    """Those of an `lcr run` tree's root (see check)."""
    kinds = own(pid) if root_is_init else []
    if not kinds:
        return None
    host = dom = ""
    if "uts" in kinds:
        host, dom = call_in(pid, ["uts"], _uts_names)
    return Namespaces(kinds=kinds, hostname=host, domainname=dom,
                      mounts=_mounts(pid) if "mnt" in kinds else [])


def _uts_names() -> tuple[str, str]:
    with open("/proc/sys/kernel/domainname") as f:
        return socket.gethostname(), f.read().strip()


def unshare_flags(ns: Namespaces | None) -> int:
    return sum(FLAGS[k] for k in ns.kinds) if ns is not None else 0


def restore(pid: int, ns: Namespaces | None) -> None:
    """What the fresh namespaces of the blank ``pid`` hold: the hostname,
    the mounts the tree made."""
    if ns is not None and ns.mounts:
        try:
            call_in(pid, ["mnt"], lambda: _mount_all(ns.mounts), what="mount the tree's mounts",
                    force=True)
        except OSError as e:
            raise RestoreError(f"cannot make the mounts of the restored tree again: "
                               f"{e.strerror or e}") from None
    if ns is None or "uts" not in ns.kinds:
        return
    try:
        call_in(pid, ["uts"], lambda: _set_uts(ns.hostname, ns.domainname),
                what="set the hostname of the restored tree")
    except OSError as e:
        raise RestoreError(f"cannot set the hostname {ns.hostname!r} of the restored tree: "
                           f"{e.strerror or e}") from None


def _set_uts(host: str, dom: str) -> None:
    socket.sethostname(host)
    ipc.setdomainname(dom.encode())


def call_in(pid: int, kinds: list[str], fn: Callable[[], Any], what: str = "",
            force: bool = False) -> Any:
    """``fn()`` run inside ``pid``'s namespaces of these kinds (and its user
    namespace first, when not root and it differs): in a child of lcr when
    they are not lcr's own (or ``force``: fn changes the process, e.g. its
    euid), else here.  Its result (pickled: lcr to lcr), or OSError /
    RestoreError as it raised."""
    kinds = [k for k in kinds if _ino(pid, k) != _ino("self", k)]
    if not kinds and not force:
        return fn()
    if os.geteuid() != 0 and _ino(pid, "user") != _ino("self", "user"):
        kinds = ["user"] + kinds
    fds = [os.open(f"/proc/{pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC) for k in kinds]
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:   # single-threaded: setns(user) is allowed here
            code = 0
            try:
                os.close(r)
                for fd in fds:
                    ipc.setns(fd)
                out = pickle.dumps(("ok", fn()))
            except RestoreError as e:
                out, code = pickle.dumps(("lcr", e.args[0] if e.args else str(e),
                                          getattr(e, "hint", None))), 1
            except BaseException as e:  # noqa: BLE001 - sent to lcr, which raises it
                out, code = pickle.dumps(("err", getattr(e, "errno", None) or 0, str(e))), 1
            try:
                with os.fdopen(w, "wb") as f:
                    f.write(out)
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            data = f.read()
        os.waitpid(child, 0)
    finally:
        for fd in fds + [x for x in (r, w) if x >= 0]:
            os.close(fd)
    if not data:
        raise RestoreError(f"cannot {what or 'work'} inside the namespaces of pid {pid}: "
                           "the helper died")
    got = pickle.loads(data)
    if got[0] == "ok":
        return got[1]
    if got[0] == "lcr":
        raise RestoreError(got[1], got[2])
    if got[1]:
        raise OSError(got[1], got[2])
    raise RestoreError(f"cannot {what or 'work'} inside the namespaces of pid {pid}: {got[2]}")
