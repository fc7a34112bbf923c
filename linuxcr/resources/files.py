"""Open files: the fd tables of all tasks and the open file descriptions
behind them (regular files, directories, harmless character devices, pipes),
plus each task's working directory and root.

Dump: every fd becomes (fd, description id, close-on-exec); descriptions
shared by several fds or tasks (dup, fork, same offset moving for all) are
found with kcmp(KCMP_FILE) and saved once.
Restore: lcr opens every description itself before it creates the tasks, so
each new task inherits them; a task then moves them onto its saved fd
numbers (dup3) and closes everything else.
"""
from __future__ import annotations

import errno
import os
import stat
import weakref
from dataclasses import dataclass, field

from linuxcr.errors import NotCheckpointable, RestoreError
from linuxcr.image.schema import FileDesc, OpenFile, PipeData, UnixPair
from linuxcr.procfs import FdInfo, list_fds, read_fd_link, read_fdinfo, read_status
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import fdkinds, pipes, unix_sockets
from linuxcr.resources.fdkinds import fown
from linuxcr.sys.syscalls import kcmp_file

O_CLOEXEC = 0o2000000
F_SETFL, F_DUPFD_CLOEXEC = 4, 1030
# Flags that open() takes back; creation flags are not in fdinfo anyway.
# (no O_PATH: an O_PATH fd is its own kind, fdkinds/opath.py; one forged into a
# regular file's flags must not give lcr an fd it cannot fcntl)
REOPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME |
                os.O_SYNC | os.O_DSYNC | os.O_DIRECTORY | os.O_LARGEFILE)
STATUS_FLAGS = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME   # F_SETFL can change these
SAFE_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
BUILTIN_KINDS = ("reg", "dir", "chr", "pipe", "unix", "external")   # external: resources/external.py
_KIND_NAMES = {"reg": "regular file", "dir": "directory", "chr": "character device"}


@dataclass(frozen=True)
class FdView:
    kind: str
    reason: str | None
    link: str
    key: tuple[int, int]       # (st_dev, st_ino) of the object
    st: os.stat_result | None = None   # what describe() read, for the dump to reuse
    info: FdInfo | None = None


def describe(pid: int, fd: int) -> FdView:
    """What an fd is, and why we cannot save it if we cannot."""
    link = read_fd_link(pid, fd)
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return FdView("?", f"fd {fd}: {link}: vanished while being inspected", link, (0, 0))
    key, mode = (st.st_dev, st.st_ino), st.st_mode

    info = read_fdinfo(pid, fd)

    def no(why: str, kind: str = "?") -> FdView:
        return FdView(kind, f"fd {fd}: {why}", link, key, st, info)
    v = _registered(pid, fd, link, st, info)   # modules of fdkinds come first
    if v is None:
        v = _builtin(fd, link, st, key, mode, no)
    why = v.reason or _owner_reason(pid, fd)
    return FdView(v.kind, why, link, key, st, info)


def _owner_reason(pid: int, fd: int) -> str | None:
    why = fown.reason(pid, fd)
    return f"fd {fd}: {why}" if why else None


def _builtin(fd: int, link: str, st: os.stat_result, key: tuple[int, int], mode: int, no) -> FdView:
    """The kinds files.py handles itself (and the refusals without a module)."""
    if link.startswith("pipe:"):
        return FdView("pipe", None, link, key)
    if link.endswith(" (deleted)") and link.startswith("/"):
        what = "character device" if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode) \
            else "file"
        why = "devices are not saved" if what != "file" else "this kind of file is not saved"
        return no(f"{what} {link}: it was unlinked and {why}; keep its name in the file system "
                  "(or close it) while checkpointing", f"unlinked {what}")
    if stat.S_ISREG(mode):
        return FdView("reg", None, link, key)
    if stat.S_ISDIR(mode):
        return FdView("dir", None, link, key)
    if stat.S_ISCHR(mode):
        if link in SAFE_DEVICES:
            return FdView("chr", None, link, key)
        if link.startswith(("/dev/pts/", "/dev/tty", "/dev/console")):
            # /dev/pts/N and /dev/ptmx are resources/fdkinds/pty.py; these are not
            return no(f"terminal {link}: this kind of terminal is not saved (pseudo-terminals "
                      "/dev/pts/N are); start the program with its input and output "
                      "redirected to files (or /dev/null)")
        return no(f"character device {link}: devices are not saved")
    if link.startswith("socket:"):
        why = unix_sockets.reason(fd, key[1])
        return FdView("unix", None, link, key) if why is None else no(why[len(f"fd {fd}: "):], "unix")
    if link.startswith("anon_inode:"):
        what = link[11:].strip("[]")
        why = UNSUPPORTED.get(what, "this kind of file is not supported yet")
        return no(f"{what} ({link}): {why}; close it before the checkpoint", what)
    if stat.S_ISFIFO(mode):
        return no(f"FIFO {link}: named pipes are not supported yet")
    return no(f"{link}: unsupported kind of file")


UNSUPPORTED = {
    "io_uring": "io_uring instances cannot be checkpointed (kernel-side queues and "
                "in-flight requests)",
    "bpf-map": "BPF maps are not saved", "bpf-prog": "BPF programs are not saved",
    "bpf_link": "BPF links are not saved", "perf_event": "perf events are not saved",
    "userfaultfd": "userfaultfd is not supported (another process may be serving its faults)",
    "kvm-vm": "KVM virtual machines are not saved",
}


def _registered(pid: int, fd: int, link: str, st: os.stat_result, info: FdInfo) -> FdView | None:
    """A kind handled by a module of resources/fdkinds."""
    ctx = fdkinds.FdContext(pid, fd, link, st, info)
    try:
        k = fdkinds.find(ctx)
        if k is None:
            return None
        why = k.reason(ctx)
    finally:
        ctx.close()      # copies a kind took to answer (ctx.grab())
    return FdView(k.name, f"fd {fd}: {why}" if why else None, link, (st.st_dev, st.st_ino), st, info)


def check(pid: int) -> list[str]:
    reasons = []
    for fd in list_fds(pid):
        try:
            v = describe(pid, fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if v.reason:
            reasons.append(v.reason)
    return reasons


class Table:
    """Descriptions found so far across the tasks of a tree (dump side)."""

    def __init__(self) -> None:
        self.descs: list[FileDesc] = []
        self.pipes: dict[int, PipeData] = {}
        self.unix: dict[int, UnixPair] = {}
        self.where: dict[int, tuple[int, int]] = {}    # socket ino -> (pid, fd) holding it
        self._seen: dict[tuple[int, int], list[tuple[int, int, int]]] = {}   # key -> (pid, fd, fid)
        self.pids: set[int] = set()                      # tasks whose files were read
        self.refs: list[tuple[int, int, int, str]] = []  # (pid, fd, pid it points at, what): pidfds, /proc files
        # files found in flight (SCM_RIGHTS): lcr's copies, kept open while the
        # table lives so that kcmp can match them against the tasks' fds
        self._held: list[int] = []
        self._depth = 0
        weakref.finalize(self, _close_fds, self._held)

    def task_files(self, pid: int) -> list[OpenFile]:
        self.pids.add(pid)
        out = []
        for fd in list_fds(pid):
            v = describe(pid, fd)
            if v.reason:
                raise RestoreError(v.reason)   # check() ran first: a race, refuse
            info = v.info       # read once, by describe()
            fid = self._same_as(pid, fd, v.key)
            if fid is None:
                fid = self._add(pid, fd, v, info.flags & ~O_CLOEXEC, info.pos)
            out.append(OpenFile(fd=fd, fid=fid, cloexec=bool(info.flags & O_CLOEXEC)))
        return out

    def _same_as(self, pid: int, fd: int, key: tuple[int, int]) -> int | None:
        self.pids.add(pid)       # (also for subclasses with their own task_files)
        for p2, fd2, fid in self._seen.get(key, []):
            if kcmp_file(pid, p2, fd, fd2):
                return fid
        return None

    def _adopt(self, fd: int) -> int:
        """Save a file lcr received in flight (a copy of ``fd`` is kept) and
        give its fid: the same description as a task's fd shares its fid."""
        me = os.getpid()
        mine = os.dup(fd)
        self._held.append(mine)
        v = describe(me, mine)
        if v.reason:
            raise NotCheckpointable(me, [f"a file in flight in a UNIX socket: {v.reason}"])
        for p2, fd2, fid in self._seen.get(v.key, []):
            if kcmp_file(me, p2, mine, fd2):
                return fid
        if self._depth > 4:
            raise NotCheckpointable(me, ["files in flight nested more than 4 deep (a socket "
                                         "passed in a socket passed in ...): not supported"])
        self._depth += 1
        try:
            return self._add(me, mine, v, v.info.flags & ~O_CLOEXEC, v.info.pos)
        finally:
            self._depth -= 1

    def _add(self, pid: int, fd: int, v: FdView, flags: int, pos: int) -> int:
        fid = len(self.descs)
        self.descs.append(None)    # reserved: a file in flight found meanwhile takes the next one
        self._seen.setdefault(v.key, []).append((pid, fd, fid))
        d = self._desc(pid, fd, fid, v, flags, pos)
        if pid != os.getpid():      # (files in flight keep no owner: nobody holds them)
            d.fown = fown.dump(pid, fd)
            if d.fown is not None and d.fown.host_pid > 0:
                self.refs.append((pid, fd, d.fown.host_pid, "the owner (F_SETOWN)"))
        self.descs[fid] = d
        return fid

    def _desc(self, pid: int, fd: int, fid: int, v: FdView, flags: int, pos: int) -> FileDesc:
        if v.kind == "pipe":
            ino = v.key[1]
            if (flags & os.O_ACCMODE) == os.O_RDONLY and ino not in self.pipes:
                self.pipes[ino] = pipes.dump(pid, fd, ino)
            return FileDesc(fid=fid, kind="pipe", flags=flags, pipe=ino)
        elif v.kind in fdkinds.BY_NAME:
            ctx = fdkinds.FdContext(pid, fd, v.link, v.st, v.info, adopt=self._adopt)
            try:
                state = fdkinds.BY_NAME[v.kind].dump(ctx)
            finally:
                ctx.close()
            if getattr(state, "host_pid", -1) > 0:       # a pidfd of a live process
                what = "pidfd" if v.kind == "pidfd" else f"{v.link} (a /proc file)"
                self.refs.append((pid, fd, state.host_pid, what))
            return FileDesc(fid=fid, kind=v.kind, flags=flags, state=state)
        elif v.kind == "unix":
            ino = v.key[1]
            self.where[ino] = (pid, fd)
            self.unix[ino] = unix_sockets.dump(pid, fd, ino, adopt=self._adopt)
            return FileDesc(fid=fid, kind="unix", flags=flags, sock=ino)
        return FileDesc(fid=fid, kind=v.kind, flags=flags, path=v.link, pos=pos)

    def check_refs(self) -> None:
        """Every process a pidfd points at must be saved too (or be a zombie
        child of a saved one: zombies are restored with the tree)."""
        for pid, fd, target, what in self.refs:
            if target in self.pids:
                continue
            try:
                st = read_status(target)
                if st.state == "Z" and st.ppid in self.pids:
                    continue
            except (FileNotFoundError, ProcessLookupError):
                pass
            raise NotCheckpointable(pid, [f"fd {fd}: {what} of pid {target}, which is not part of "
                                          "the checkpointed tree: checkpoint a common ancestor, "
                                          "or close it first"])

    def unix_list(self) -> list[UnixPair]:
        """Both ends of every pair; a peer outside the tree cannot be saved.
        (Called once every task is read: also checks pidfd targets.)"""
        self.check_refs()
        for ino, u in self.unix.items():
            if u.peer not in self.unix:
                pid, fd = self.where[ino]
                raise NotCheckpointable(pid, [f"fd {fd}: UNIX socket:[{ino}] is connected to "
                                              f"socket:[{u.peer}], which no process of the tree holds"])
        return list(self.unix.values())

    def pipe_list(self) -> list[PipeData]:
        """Every pipe referenced; those with no read end anywhere keep no bytes."""
        inos = {d.pipe for d in self.descs if d.kind == "pipe"}
        return [self.pipes.get(ino) or pipes.empty(ino) for ino in sorted(inos)]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


# --- restore ---------------------------------------------------------------

@dataclass
class OpenEnv:
    """What the kinds' after_open/finish_open hooks see once every
    description is open in lcr."""
    ours: dict[int, int]                                   # fid -> lcr's fd
    names: dict[bytes, int] = field(default_factory=dict)  # UNIX name -> lcr's fd bound to it
    descs: list[FileDesc] = field(default_factory=list)



def open_all(descs: list[FileDesc], pipe_data: list[PipeData],
             unix: list[UnixPair] = ()) -> dict[int, int]:
    """Open every description in lcr (fid -> our fd), before the tasks exist."""
    ours: dict[int, int] = {}
    ends: dict[int, tuple[int, int]] = {}
    socks: dict[int, int] = {}
    used: set[int] = set()
    try:
        for p in pipe_data:
            ends[p.ino] = pipes.create(p)
        pairs = {u.ino: u for u in unix}
        for u in unix:
            if u.ino in socks:
                continue
            peer = pairs.get(u.peer)
            if peer is None or peer.peer != u.ino or peer.type != u.type:
                raise RestoreError(f"socket:[{u.ino}] has no matching peer in the image")
            socks[u.ino], socks[peer.ino] = unix_sockets.create(u, peer)
            ends[-u.ino] = (socks[u.ino], socks[peer.ino])   # closed with the rest
        for d in descs:
            if d.kind == "unix":
                if d.sock not in socks or socks[d.sock] in used:
                    raise RestoreError(f"socket:[{d.sock}] is missing or opened twice in the image")
                ours[d.fid] = socks[d.sock]
                os.set_blocking(ours[d.fid], not d.flags & os.O_NONBLOCK)
            else:
                ours[d.fid] = _open_one(d, ends, used)
            used.add(ours[d.fid])
        _after_open(descs, ours, pairs, socks)
    except BaseException:
        close_all(ours, ends)
        raise
    for r, w in ends.values():   # ends nobody uses
        for x in (r, w):
            if x not in used:
                os.close(x)
    return ours


def _after_open(descs: list[FileDesc], ours: dict[int, int], pairs: dict[int, UnixPair],
                socks: dict[int, int]) -> None:
    """Queues that may carry open files go back once all are open (first
    every queue, then every shutdown: a sender may be shut down itself)."""
    env = OpenEnv(ours, descs=descs)
    for d in descs:
        name = getattr(d.state, "name", b"") if d.kind == "unix_bound" else b""
        if name:
            env.names[name] = ours[d.fid]
    done: set[int] = set()
    for ino, u in pairs.items():
        if ino not in done:
            done |= {ino, u.peer}
            unix_sockets.fill(socks[ino], socks[u.peer], u, pairs[u.peer], ours)
    for hook in ("after_open", "finish_open"):
        for d in descs:
            fn = getattr(fdkinds.BY_NAME.get(d.kind), hook, None)
            if fn is not None:
                fn(ours[d.fid], d.state, env)
    for ino, u in pairs.items():
        unix_sockets.shut(socks[ino], u)


def _open_one(d: FileDesc, ends: dict[int, tuple[int, int]], used: set[int]) -> int:
    if d.kind in fdkinds.BY_NAME:
        if d.state is None:
            raise RestoreError(f"open file #{d.fid} ({d.kind}) has no saved state")
        try:
            return fdkinds.BY_NAME[d.kind].open(d.state, d.flags)
        except OSError as e:
            raise RestoreError(f"cannot recreate a {d.kind}: {e.strerror}") from None
    if d.kind not in BUILTIN_KINDS:
        raise RestoreError(f"unsupported kind of open file {d.kind!r}")
    if d.kind == "external":   # opened by resources/external.py from `--fd N=...`
        raise RestoreError(f"open file #{d.fid} was an external connection ({d.path})",
                           "restart it with lcr restart --fd N=PATH|-|&M")
    if d.kind == "pipe":
        if d.pipe not in ends:
            raise RestoreError(f"pipe:[{d.pipe}] has no saved state")
        r, w = ends[d.pipe]
        end = r if (d.flags & os.O_ACCMODE) == os.O_RDONLY else w
        # a second description of the same end: open the pipe again through /proc
        fd = end if end not in used else os.open(f"/proc/self/fd/{end}", (d.flags & os.O_ACCMODE) | O_CLOEXEC)
        os.set_blocking(fd, not d.flags & os.O_NONBLOCK)
        return fd
    try:   # O_NONBLOCK: a FIFO where a file was must not hang us; checked below
        fd = os.open(d.path, (d.flags & REOPEN_FLAGS) | O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise RestoreError(f"cannot open {d.path}: {e.strerror}",
                           "the file must exist at the same path on this machine") from None
    mode = os.fstat(fd).st_mode
    want = {"reg": stat.S_ISREG, "dir": stat.S_ISDIR, "chr": stat.S_ISCHR}[d.kind]
    if not want(mode):
        os.close(fd)
        raise RestoreError(f"{d.path} is no longer a {_KIND_NAMES[d.kind]}",
                           "the file system changed since the checkpoint")
    if not d.flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    if d.kind in ("reg", "dir") and d.pos:
        try:
            os.lseek(fd, d.pos, os.SEEK_SET)
        except OSError as e:
            if e.errno != errno.ESPIPE:
                os.close(fd)
                raise RestoreError(f"cannot seek {d.path} to offset {d.pos}: {e.strerror}") from None
    return fd


def close_all(ours: dict[int, int], ends: dict[int, tuple[int, int]] | None = None) -> None:
    fds = set(ours.values())
    for r, w in (ends or {}).values():
        fds |= {r, w}
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def install(t: Tracee, files: list[OpenFile], ours: dict[int, int]) -> None:
    """Put the inherited descriptions on the saved fd numbers; close the rest.

    The task inherited lcr's whole fd table: move what it needs above every
    number in play, close everything below, dup3 down, close the movers."""
    need = sorted({ours[f.fid] for f in files})
    base = max([f.fd for f in files] + need + [2]) + 1
    moved = {fd: t.syscall("fcntl", fd, F_DUPFD_CLOEXEC, base) for fd in need}
    t.syscall("close_range", 0, base - 1, 0)
    for f in files:
        t.syscall("dup3", moved[ours[f.fid]], f.fd, O_CLOEXEC if f.cloexec else 0)
    t.syscall("close_range", base, 0xFFFFFFFF, 0)


def after_install(t: Tracee, arena: Arena, files: list[OpenFile], descs: list[FileDesc]) -> None:
    """Per-task work of kinds that refer to the task's own fd numbers (epoll...)."""
    by_fid = {d.fid: d for d in descs}
    table = {f.fd: by_fid[f.fid] for f in files}
    for f in files:
        d = by_fid[f.fid]
        kind = fdkinds.BY_NAME.get(d.kind)
        hook = getattr(kind, "after_install", None)
        if hook is not None:
            hook(t, arena, f.fd, d.state, table)
    for f in files:          # owner, signal, O_ASYNC, lease: on the final file of each fd
        d = by_fid[f.fid]
        if d.fown is not None or d.flags & fown.FASYNC:
            fown.restore(t, arena, f.fd, d.flags, d.fown)


def restore_fs(t: Tracee, arena: Arena, cwd: str, root: str) -> None:
    if root != "/":
        try:
            t.syscall("chroot", arena.cstr(root))
        except OSError as e:
            raise RestoreError(f"cannot change root to {root}: {e.strerror}",
                               "restoring a chroot'ed process needs CAP_SYS_CHROOT") from None
    try:
        t.syscall("chdir", arena.cstr(cwd))
    except OSError as e:
        raise RestoreError(f"cannot enter working directory {cwd}: {e.strerror}",
                           "it must exist at the same path on this machine") from None
