"""Where an image's bytes come from, and who could have written them.

Trust is decided by who could have written the bytes, not by what the image
says.  For an image read from a path, a pipe, a socket or a device, this
module lists every user who could have put the bytes there (``Source``):

- a regular file or device: its owner; anyone when the mode (or a POSIX
  ACL entry) lets its group or others write;
- a FIFO or pipe: its owner, anyone the mode lets write, and every process
  holding its write end now (found through /proc/*/fd matching the inode);
  nobody holding it any more: unknown (the writer is gone);
- a UNIX socket: the peer's credentials (SO_PEERCRED) and every process
  holding the peer socket now; another kind of socket: anyone;
- for a path: every symlink followed on the way (its owner chose the
  target), and the directory holding the final name: its owner, and anyone
  when others may write it without the sticky bit (they could have swapped
  the file).

``Source.trusted_by(uid)``: only ``uid`` and root could have written it.
Root restoring an image that is not trusted_by(0) grants nothing it asks
without --trust or a good --verify signature (resources/process.py).

``resolve(path)`` walks a path the way the kernel does, one component at a
time, and reports the symlinks it followed and the final directory: the
writer (files.output_image) uses it to refuse links it did not expect.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
from dataclasses import dataclass, field

MAX_LINKS = 40                    # as the kernel (ELOOP)
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
_SO_PEERCRED_FMT = "iII"          # struct ucred: pid, uid, gid


# --- resolving a path ----------------------------------------------------------

@dataclass(frozen=True)
class Link:
    path: str          # the symlink itself
    uid: int           # its owner
    dir_open: bool     # its directory is writable by others without the sticky bit


@dataclass
class Resolved:
    """``path`` walked: the symlinks followed, the final directory and entry."""
    path: str                         # as given
    dir: str                          # the directory holding the final name (no symlink in it)
    name: str                         # the final name in it
    dir_st: os.stat_result
    entry: os.stat_result | None      # lstat of the final entry (None: does not exist)
    links: list[Link] = field(default_factory=list)
    magic: bool = False               # the final entry is a /proc magic link (an open file)

    @property
    def final(self) -> str:
        return os.path.join(self.dir, self.name)


def open_dir(st: os.stat_result) -> bool:
    """A directory others may write without the sticky bit: anyone able to
    write it can swap any name in it."""
    return bool(st.st_mode & (stat.S_IWOTH | stat.S_IWGRP)) and not st.st_mode & stat.S_ISVTX


def _in_proc(d: str) -> bool:
    return d == "/proc" or d.startswith("/proc/")


def resolve(path: str) -> Resolved:
    """Walk ``path`` component by component (lstat), following symlinks as
    the kernel would and noting each.  Raises OSError as open() would
    (ENOENT for a missing directory, ELOOP, ENOTDIR)."""
    if not path:
        raise FileNotFoundError(2, "empty path", path)
    cur = "/" if path.startswith("/") else os.getcwd()
    todo = list(reversed(path.split("/")))
    links: list[Link] = []
    while True:
        while todo and todo[-1] in ("", "."):
            todo.pop()
        if not todo:
            # the path names a directory (ends in / or .): its own parent holds it
            st = os.stat(cur)
            parent = os.path.dirname(cur) if cur != "/" else "/"
            return Resolved(path, parent, os.path.basename(cur) or ".", os.stat(parent), st, links)
        comp = todo.pop()
        last = not any(p not in ("", ".") for p in todo)
        if comp == "..":
            cur = os.path.dirname(cur) or "/"
            continue
        nxt = os.path.join(cur, comp)
        try:
            lst = os.lstat(nxt)
        except FileNotFoundError:
            if last:
                return Resolved(path, cur, comp, os.stat(cur), None, links)
            raise
        if stat.S_ISLNK(lst.st_mode):
            if len(links) >= MAX_LINKS:
                raise OSError(40, "too many levels of symbolic links", path)
            dir_st = os.stat(cur)
            links.append(Link(nxt, lst.st_uid, open_dir(dir_st)))
            if _in_proc(cur):
                # a magic link (/proc/self/fd/1, /proc/PID/cwd): its target is
                # an open file, not a path; the kernel follows it
                if last:
                    return Resolved(path, cur, comp, dir_st, lst, links, magic=True)
                cur = os.path.realpath(nxt)
                continue
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            todo.extend(reversed(target.split("/")))
            continue
        if last:
            return Resolved(path, cur, comp, os.stat(cur), lst, links)
        if not stat.S_ISDIR(lst.st_mode):
            raise NotADirectoryError(20, "not a directory", nxt)
        cur = nxt


# --- who could have written an open image -----------------------------------------

Writer = tuple[int | None, str]   # (uid, or None for "anyone / unknown"; why)


@dataclass(frozen=True)
class Source:
    """An image's source and everyone who could have written its bytes."""
    name: str
    writers: tuple[Writer, ...]

    def trusted_by(self, uid: int) -> bool:
        return all(w in (uid, 0) for w, _ in self.writers)

    def why_not(self, uid: int) -> str:
        """The first reason ``uid`` cannot trust it ("" if it can)."""
        return next((why for w, why in self.writers if w not in (uid, 0)), "")


def _mode_writers(st: os.stat_result, what: str) -> list[Writer]:
    out: list[Writer] = [(st.st_uid, f"{what} is owned by uid {st.st_uid}")]
    if st.st_mode & stat.S_IWOTH:
        out.append((None, f"{what} is writable by everyone"))
    if st.st_mode & stat.S_IWGRP:
        out.append((None, f"{what} is writable by group {st.st_gid}"))
    return out


def _acl_writers(fd: int, what: str) -> list[Writer]:
    """Named users and groups a POSIX ACL lets write (the mask permitting)."""
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError:
        return []
    entries = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 7)
    out: list[Writer] = []
    for tag, perm, ident in entries:
        if perm & mask & 2 and tag == _ACL_USER:
            out.append((ident, f"{what} is writable by uid {ident} (ACL)"))
        elif perm & mask & 2 and tag == _ACL_GROUP:
            out.append((None, f"{what} is writable by group {ident} (ACL)"))
    return out


def _status_uids(pid: str) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:]}
    return set()


def holders(match: str | None, dev_ino: tuple[int, int] | None, writing: bool) -> list[tuple[int, set[int]]]:
    """(pid, its uids) of every process (but us) with an fd whose link is
    ``match`` ("pipe:[INO]", "socket:[INO]") or that opens ``dev_ino``;
    with ``writing``, only fds open for writing."""
    me = str(os.getpid())
    out: list[tuple[int, set[int]]] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link != match:
                    if dev_ino is None or not link.startswith("/"):
                        continue
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (st.st_dev, st.st_ino) != dev_ino:
                        continue
                if writing and not _fd_writes(pid, fd):
                    continue
                out.append((int(pid), _status_uids(pid)))
                break
            except OSError:
                continue
    return out


def _fd_writes(pid: str, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    return False


def _pipe_writers(st: os.stat_result, what: str, named: bool) -> list[Writer]:
    out = _mode_writers(st, what) if named else [(st.st_uid, f"{what} was made by uid {st.st_uid}")]
    found = holders(f"pipe:[{st.st_ino}]", (st.st_dev, st.st_ino) if named else None, True)
    for pid, uids in found:
        out += [(u, f"{what} is written by pid {pid} (uid {u})") for u in sorted(uids)]
    if not found:
        out.append((None, f"{what} has no writer left: who wrote it cannot be told"))
    return out


def _socket_writers(fd: int, st: os.stat_result, what: str) -> list[Writer]:
    s = socket.socket(fileno=os.dup(fd))
    try:
        if s.family != socket.AF_UNIX:
            return [(None, f"{what} is a network socket: anyone who reached it could write")]
        pid, uid, _gid = struct.unpack(_SO_PEERCRED_FMT, s.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_SO_PEERCRED_FMT)))
    except OSError:
        return [(None, f"{what}: its peer cannot be told")]
    finally:
        s.close()
    out: list[Writer] = [(uid, f"{what} is connected to pid {pid} (uid {uid})")]
    from linuxcr.sys.sockdiag import unix_diag
    diag = unix_diag(st.st_ino)
    if diag is None or not diag.peer:
        out.append((None, f"{what}: its peer cannot be told"))
        return out
    for hpid, uids in holders(f"socket:[{diag.peer}]", None, False):
        out += [(u, f"{what} is connected to a socket held by pid {hpid} (uid {u})")
                for u in sorted(uids)]
    return out


def _inode_writers(fd: int, st: os.stat_result, what: str, named: bool) -> list[Writer]:
    m = st.st_mode
    if stat.S_ISREG(m):
        return _mode_writers(st, what) + _acl_writers(fd, what)
    if stat.S_ISFIFO(m):
        return _pipe_writers(st, what if named else f"{what} (a pipe)", named)
    if stat.S_ISSOCK(m):
        return _socket_writers(fd, st, f"{what} (a socket)")
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return _mode_writers(st, f"{what} (a device)")
    return [(None, f"{what} is not a file, pipe or socket")]


def _path_writers(r: Resolved, st: os.stat_result) -> list[Writer]:
    out: list[Writer] = []
    for link in r.links:
        out.append((link.uid, f"{r.path} goes through the symlink {link.path} owned by uid {link.uid}"))
        if link.dir_open:
            out.append((None, f"the symlink {link.path} sits in a directory others may write"))
    if r.magic:
        return out
    d = r.dir
    out.append((r.dir_st.st_uid, f"{r.path} is in {d}, owned by uid {r.dir_st.st_uid}"))
    if open_dir(r.dir_st):
        out.append((None, f"{r.path} is in {d}, which others may write (no sticky bit)"))
    if r.entry is None or (r.entry.st_dev, r.entry.st_ino) != (st.st_dev, st.st_ino):
        out.append((None, f"{r.path} changed while it was opened"))
    return out


def source_of(fd: int, path: str | None, name: str) -> Source:
    """Who could have written the image open as ``fd`` (opened from
    ``path``, or given as an fd: stdin)."""
    st = os.fstat(fd)
    writers: list[Writer] = []
    if path is None:
        # an fd (stdin): a file or FIFO it was opened from still has a path
        # (its directory counts as for a path); a pipe or socket has none
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if where.startswith("/") and not where.endswith(" (deleted)"):
            try:
                writers += _path_writers(resolve(where), st)
            except OSError as e:
                writers.append((None, f"{name} ({where}) cannot be walked: {e.strerror}"))
            named = True
        else:
            named = False
    else:
        try:
            writers += _path_writers(resolve(path), st)
        except OSError as e:
            writers.append((None, f"{path} cannot be walked: {e.strerror}"))
        named = True
    writers += _inode_writers(fd, st, name, named)
    return Source(name, tuple(writers))
