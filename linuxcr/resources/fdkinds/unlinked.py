"""Open files that were unlinked: a regular file with no name left (nlink 0),
shown as "/path (deleted)"; plus what memfd.py and memory.py share with it:
reading an inode's content, and the registry of inodes a restart recreated.

Dump: the content (only the runs of data: SEEK_DATA/SEEK_HOLE, holes stay
holes) read with pread through a private read-only open of our own copy of
the file, so the program's offset never moves; size, mode, owner, times; the
description's offset (its flags are in FileDesc).  At most MAX_CONTENT bytes
of data per file: more is refused, naming the size.
Restore: lcr creates the file again at its old path (when that name is
taken now, under a new name in the same directory; when the directory is
gone, the restart is refused), unlinks it at once, writes the content, and
opens each saved description through /proc/self/fd, so that every fd and
every mapping of one unlinked file share one new inode (keyed by the saved
(st_dev, st_ino)).  Mode, owner and times are applied once every
description is open (memory.open_shm calls OBJECTS.finish()).
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Callable

from linuxcr.errors import ImageError, RestoreError
from linuxcr.image.kinds import MAX_CONTENT, MAX_EXTENTS, Extent, FileContent, UnlinkedState

DELETED = " (deleted)"
O_CLOEXEC = 0o2000000
# open(2) flags a description takes back (creation flags are not in fdinfo)
REOPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME |
                os.O_SYNC | os.O_DSYNC | os.O_LARGEFILE | os.O_PATH)
READ_CHUNK = 1 << 20


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# --- dump: an inode's content ------------------------------------------------

def open_private(fd: int) -> int:
    """A read-only description of our own for the file behind fd: seeking it
    (SEEK_DATA) moves no offset the program sees.  OSError if refused."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | O_CLOEXEC)


def data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every run of data in [0, size); fd is ours to seek."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:        # only a hole up to the end
                break
            return [(0, size)]                # no SEEK_DATA here: all of it
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        runs.append((start, end - start))
        pos = end
    if len(runs) > MAX_EXTENTS:               # too fragmented: one run, holes read as zeros
        runs = [(runs[0][0], runs[-1][0] + runs[-1][1] - runs[0][0])]
    return runs


def too_big(what: str, runs: list[tuple[int, int]], size: int) -> str | None:
    n = sum(length for _, length in runs)
    if n > MAX_CONTENT:
        return (f"{what}: {_mib(n)} of data (size {_mib(size)}), more than the "
                f"{_mib(MAX_CONTENT)} lcr saves per file")
    return None


def _pread_all(fd: int, n: int, off: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, min(n - got, READ_CHUNK), off + got)
        if not b:       # shrank meanwhile (cannot: the tree is frozen) - holes
            parts.append(bytes(n - got))
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_content(fd: int, st: os.stat_result, key: tuple[int, int] | None = None) -> FileContent:
    """The whole content of the inode behind fd (ours, seekable, readable)."""
    runs = data_runs(fd, st.st_size)
    dev, ino = key or (st.st_dev, st.st_ino)
    return FileContent(dev=dev, ino=ino, size=st.st_size, mode=stat.S_IMODE(st.st_mode),
                       uid=st.st_uid, gid=st.st_gid, atime_ns=max(st.st_atime_ns, 0),
                       mtime_ns=max(st.st_mtime_ns, 0),
                       extents=[Extent(offset=off, data=_pread_all(fd, n, off)) for off, n in runs])


def content_reason(ctx, what: str) -> str | None:
    """Why the content of ctx's file cannot be saved (None: it can)."""
    try:
        fd = open_private(ctx.grab())
    except OSError as e:
        return f"{what}: cannot read it ({e.strerror})"
    finally:
        ctx.close()
    try:
        return too_big(what, data_runs(fd, ctx.st.st_size), ctx.st.st_size)
    finally:
        os.close(fd)


def dump_content(ctx) -> FileContent:
    fd = open_private(ctx.grab())
    try:
        return read_content(fd, ctx.st)
    finally:
        os.close(fd)


# --- restore: the registry of recreated inodes --------------------------------

@dataclass
class Made:
    fd: int                                   # lcr's O_RDWR fd of the new inode
    content: FileContent
    final: Callable[[int], None]              # mode, owner, times, seals


class Objects:
    """The memfds and unlinked files one restart has made, by saved (dev, ino).

    fd kinds make them while files.open_all runs; memory.open_shm makes the
    ones only mapped, finishes them all and takes their fds (for mmap; closed
    with the shared memory objects).  forget() drops what a failed restart
    left behind."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, int], Made] = {}

    def get(self, content: FileContent, create: Callable[[], int],
            final: Callable[[int], None]) -> int:
        key = (content.dev, content.ino)
        m = self.made.get(key)
        if m is None:
            check_extents(content)
            fd = create()
            try:
                fill(fd, content)
            except BaseException:
                os.close(fd)
                raise
            m = self.made[key] = Made(fd, content, final)
        return m.fd

    def finish(self) -> dict[tuple[int, int], int]:
        """Apply what must come last; hand over the fds (key -> fd)."""
        out = {}
        try:
            for key, m in self.made.items():
                m.final(m.fd)
                out[key] = m.fd
        except BaseException:
            self.forget()
            raise
        self.made = {}
        return out

    def forget(self) -> None:
        for m in self.made.values():
            try:
                os.close(m.fd)
            except OSError:
                pass
        self.made = {}


OBJECTS = Objects()


def check_extents(c: FileContent) -> None:
    end = 0
    for e in c.extents:
        if e.offset < end or e.offset + len(e.data) > c.size:
            raise ImageError(f"image holds the content of inode {c.ino} with data outside "
                             f"its size {c.size} or out of order")
        end = e.offset + len(e.data)
    if sum(len(e.data) for e in c.extents) > MAX_CONTENT:
        raise ImageError(f"image holds more than {_mib(MAX_CONTENT)} of data for inode {c.ino}")


def fill(fd: int, c: FileContent) -> None:
    try:
        os.ftruncate(fd, c.size)
        for e in c.extents:
            view, off = memoryview(e.data), e.offset
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
    except (OSError, OverflowError) as e:
        raise RestoreError(f"cannot write the saved content ({_mib(c.size)}) of a recreated file: "
                           f"{getattr(e, 'strerror', None) or e}") from None


def apply_attrs(fd: int, c: FileContent, chmod: bool = True) -> None:
    """Owner (when we may), mode, times: after the content and every open."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (c.uid, c.gid):
        try:
            os.fchown(fd, c.uid, c.gid)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise
    if chmod and stat.S_IMODE(os.fstat(fd).st_mode) != c.mode:
        os.fchmod(fd, c.mode)
    if c.mtime_ns or c.atime_ns:
        os.utime(fd, ns=(c.atime_ns, c.mtime_ns))


def reopen(obj_fd: int, flags: int, pos: int, what: str) -> int:
    """A new description of the inode behind obj_fd, with the saved flags and offset."""
    try:
        fd = os.open(f"/proc/self/fd/{obj_fd}", (flags & REOPEN_FLAGS) | O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot open the recreated {what}: {e.strerror}") from None
    if pos:
        try:
            os.lseek(fd, pos, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise RestoreError(f"cannot seek the recreated {what} to offset {pos}: {e.strerror}") from None
    return fd


def free_names(path: str) -> list[str]:
    """path, then other names beside it to try when path is taken."""
    d = os.path.dirname(path) or "/"
    base = os.path.basename(path)
    return [path] + [os.path.join(d, f"{base}.lcr-{secrets.token_hex(4)}" if len(base) < 240
                                  else f".lcr-{secrets.token_hex(4)}") for _ in range(8)]


def create_file(path: str) -> int:
    """A new empty file at path, unlinked at once (its fd shows
    "path (deleted)"); another name in the same directory if path is taken."""
    d = os.path.dirname(path) or "/"
    if not os.path.isdir(d):
        raise RestoreError(f"cannot recreate unlinked file {path}: directory {d} does not exist",
                           "create the directory before restarting")
    for name in free_names(path):
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise RestoreError(f"cannot recreate unlinked file {path}: {e.strerror}") from None
        try:
            os.unlink(name)
        except OSError as e:
            os.close(fd)
            raise RestoreError(f"cannot unlink the recreated file {name}: {e.strerror}") from None
        return fd
    raise RestoreError(f"cannot recreate unlinked file {path}: no free name in {d}")


def make(state: UnlinkedState) -> int:
    """lcr's fd of the recreated file (made once per inode per restart)."""
    return OBJECTS.get(state.content, lambda: create_file(state.path),
                       lambda fd: apply_attrs(fd, state.content))


# --- the kind -------------------------------------------------------------

def is_unlinked_file(link: str, st: os.stat_result) -> bool:
    return (link.startswith("/") and link.endswith(DELETED) and not link.startswith("/memfd:")
            and stat.S_ISREG(st.st_mode))


class Unlinked:
    name = "unlinked"

    def matches(self, ctx) -> bool:
        return is_unlinked_file(ctx.link, ctx.st)

    def reason(self, ctx) -> str | None:
        path = ctx.link[: -len(DELETED)]
        if ctx.st.st_nlink:
            return (f"{ctx.link}: unlinked, yet still linked under another name "
                    f"({ctx.st.st_nlink} links): not supported")
        d = os.path.dirname(path) or "/"
        try:
            if os.stat(d).st_dev != ctx.st.st_dev:
                return (f"{ctx.link}: not on the file system of {d} (a kernel object, or its "
                        "directory was replaced): not supported")
        except OSError:
            pass     # the directory is gone too: the restart will say so
        return content_reason(ctx, f"unlinked file {path}")

    def dump(self, ctx) -> UnlinkedState:
        return UnlinkedState(path=ctx.link[: -len(DELETED)], content=dump_content(ctx),
                             pos=max(ctx.info.pos, 0))

    def open(self, state: UnlinkedState, flags: int) -> int:
        return reopen(make(state), flags, state.pos, f"unlinked file {state.path}")


KIND = Unlinked()
