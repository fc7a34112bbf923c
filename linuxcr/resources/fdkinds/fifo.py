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
with the saved access mode and blocking flag."""
from __future__ import annotations

import fcntl
import os
import stat
import termios

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import MAX_FIFO, FifoState
from linuxcr.resources import pipes
from linuxcr.resources.fdkinds.unlinked import DELETED, O_CLOEXEC

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
        if ctx.link.endswith(DELETED):
            return (f"FIFO {ctx.link}: it was unlinked; only FIFOs still in the file "
                    "system are restored")
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
        return FifoState(path=ctx.link, size=size, data=data)

    def open(self, state: FifoState, flags: int) -> int:
        path = state.path
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


def _unread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


KIND = Fifo()
