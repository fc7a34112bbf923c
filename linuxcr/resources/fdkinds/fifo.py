"""FIFOs (named pipes): the path, the description's flags (read end, write
end or O_RDWR, in FileDesc), the FIFO's capacity and its unread bytes.

Dump: the bytes are copied with tee(2) (pipes.py), never consumed: from our
copy of the fd when it can read, else from a read-only open of our own
(O_NONBLOCK: it never waits for a writer).  Restore: the FIFO must still be
at its path.  lcr opens it O_RDWR|O_NONBLOCK first (so nothing blocks and a
writer finds a reader), gives it its capacity, puts the saved bytes back if
it is empty (once per FIFO: the next description of the same FIFO finds
them there; a FIFO that some process outside the tree kept open keeps the
bytes it holds), then opens the saved description through /proc/self/fd
with the saved access mode and blocking flag.

An unlinked FIFO (its fd shows "PATH (deleted)"): its owner and mode are
saved too; lcr makes a FIFO again beside the old path (another name if that
one is taken), opens it and unlinks it at once, then fills it as above.
Every description of one unlinked FIFO (same saved (dev, ino)) opens the
same new FIFO (MADE, emptied by finish_open)."""
from __future__ import annotations

import fcntl
import os
import stat
import termios

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import MAX_FIFO, FifoState
from linuxcr.resources import pipes
from linuxcr.resources.fdkinds.unlinked import DELETED, O_CLOEXEC, free_names

F_SETPIPE_SZ, F_GETPIPE_SZ = pipes.F_SETPIPE_SZ, pipes.F_GETPIPE_SZ
FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_LARGEFILE


def _peek(fd: int) -> tuple[int, bytes]:
    """Capacity and unread bytes of the pipe behind a readable fd (tee)."""
    size = fcntl.fcntl(fd, F_GETPIPE_SZ)
    r, w = os.pipe2(os.O_NONBLOCK | O_CLOEXEC)
    try:
        if fcntl.fcntl(w, F_GETPIPE_SZ) < size:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        n = pipes.tee(fd, w, size)
        return size, os.read(r, n) if n else b""
    finally:
        os.close(r)
        os.close(w)


class Fifo:
    name = "fifo"

    def matches(self, ctx) -> bool:
        return stat.S_ISFIFO(ctx.st.st_mode) and ctx.link.startswith("/")

    def reason(self, ctx) -> str | None:
        if ctx.link.endswith(DELETED) and ctx.st.st_nlink:
            return (f"FIFO {ctx.link}: unlinked, yet still linked under another name "
                    f"({ctx.st.st_nlink} links): not supported; close it before the checkpoint")
        try:
            size = fcntl.fcntl(ctx.grab(), F_GETPIPE_SZ)
        except OSError as e:
            return f"FIFO {ctx.link}: cannot inspect it ({e.strerror})"
        finally:
            ctx.close()
        if size > MAX_FIFO:
            return f"FIFO {ctx.link}: its capacity of {size} bytes is more than lcr saves ({MAX_FIFO})"
        return None

    def dump(self, ctx) -> FifoState:
        g = ctx.grab()
        if (ctx.info.flags & os.O_ACCMODE) == os.O_WRONLY:
            r = os.open(f"/proc/self/fd/{g}", os.O_RDONLY | os.O_NONBLOCK | O_CLOEXEC)
            try:
                size, data = _peek(r)
            finally:
                os.close(r)
        else:
            size, data = _peek(g)
        if not ctx.link.endswith(DELETED):
            return FifoState(path=ctx.link, size=size, data=data)
        st = ctx.st
        return FifoState(path=ctx.link[: -len(DELETED)], size=size, data=data, unlinked=True,
                         dev=st.st_dev, ino=st.st_ino, mode=stat.S_IMODE(st.st_mode),
                         uid=st.st_uid, gid=st.st_gid)

    def open(self, state: FifoState, flags: int) -> int:
        path = state.path
        if state.unlinked:
            key = (state.dev, state.ino)
            if key not in MADE:
                MADE[key] = _make_unlinked(state)
            keep = os.open(f"/proc/self/fd/{MADE[key]}", os.O_RDWR | os.O_NONBLOCK | O_CLOEXEC)
        else:
            try:
                keep = os.open(path, os.O_RDWR | os.O_NONBLOCK | O_CLOEXEC | os.O_NOCTTY)
            except OSError as e:
                raise RestoreError(f"cannot open FIFO {path}: {e.strerror}",
                                   "the FIFO must exist at the same path (mkfifo) before restarting") from None
        try:
            if not stat.S_ISFIFO(os.fstat(keep).st_mode):
                raise RestoreError(f"{path} is no longer a FIFO",
                                   "the file system changed since the checkpoint")
            if fcntl.fcntl(keep, F_GETPIPE_SZ) < max(state.size, len(state.data)):
                try:
                    fcntl.fcntl(keep, F_SETPIPE_SZ, max(state.size, len(state.data)))
                except OSError as e:
                    raise RestoreError(f"cannot give FIFO {path} its capacity of {state.size} bytes: "
                                       f"{e.strerror}",
                                       "raise /proc/sys/fs/pipe-max-size or run as root") from None
            if state.data and _unread(keep) == 0:
                n = os.write(keep, state.data)
                if n != len(state.data):
                    raise RestoreError(f"FIFO {path}: only {n} of its {len(state.data)} saved bytes fit")
            fd = os.open(f"/proc/self/fd/{keep}", (flags & FLAGS) | os.O_NONBLOCK | O_CLOEXEC)
            os.set_blocking(fd, not flags & os.O_NONBLOCK)
            return fd
        finally:
            os.close(keep)


    def finish_open(self, fd: int, state: FifoState, env) -> None:
        """Every description is open: lcr's own hold on unlinked FIFOs goes."""
        made = MADE.pop((state.dev, state.ino), None) if state.unlinked else None
        if made is not None:
            os.close(made)


# unlinked FIFOs made by this restart: saved (dev, ino) -> lcr's O_RDWR fd
MADE: dict[tuple[int, int], int] = {}


def _make_unlinked(state: FifoState) -> int:
    """A new FIFO beside the old path, opened O_RDWR and unlinked at once."""
    d = os.path.dirname(state.path) or "/"
    if not os.path.isdir(d):
        raise RestoreError(f"cannot make unlinked FIFO {state.path} again: directory {d} does "
                           "not exist", "create the directory before restarting")
    for name in free_names(state.path):
        try:
            os.mkfifo(name, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise RestoreError(f"cannot make unlinked FIFO {state.path} again: {e.strerror}") from None
        try:
            fd = os.open(name, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | O_CLOEXEC)
        finally:
            os.unlink(name)
        try:
            if (state.uid, state.gid) != (os.getuid(), os.getgid()):
                try:
                    os.fchown(fd, state.uid, state.gid)
                except OSError:
                    pass          # not ours to give away (rootless): the owner stays ours
            os.fchmod(fd, state.mode)
        except OSError as e:
            os.close(fd)
            raise RestoreError(f"cannot give unlinked FIFO {state.path} its mode: {e.strerror}") from None
        return fd
    raise RestoreError(f"cannot make unlinked FIFO {state.path} again: no free name in {d}")


def _unread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


KIND = Fifo()
