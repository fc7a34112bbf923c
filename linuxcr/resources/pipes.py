"""Pipes: the pipe object (capacity, unread bytes) and its two ends.

Dump: take our own copy of a read end (pidfd_getfd) and tee(2) its contents
into a pipe of ours: the bytes are copied, not consumed, so the program
reads them all the same if it is left running.  Restore: lcr makes a pipe of
the same capacity and writes the bytes back before the tasks inherit it."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from linuxcr.errors import RestoreError
from linuxcr.image.schema import PipeData
from linuxcr.sys.syscalls import libc, pidfd_getfd, pidfd_open

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SPLICE_F_NONBLOCK = 2
DEFAULT_SIZE = 65536


def tee(fd_in: int, fd_out: int, n: int) -> int:
    """Copy up to n bytes from pipe fd_in into pipe fd_out without consuming
    them (tee(2), non-blocking); 0 if fd_in is empty."""
    ret = libc.tee(ctypes.c_int(fd_in), ctypes.c_int(fd_out), ctypes.c_size_t(n),
                   ctypes.c_uint(SPLICE_F_NONBLOCK))
    if ret < 0:
        e = ctypes.get_errno()
        if e == errno.EAGAIN:
            return 0     # empty
        raise OSError(e, os.strerror(e))
    return ret


def dump(pid: int, fd: int, ino: int) -> PipeData:
    """Capacity and unread bytes of the pipe behind read end ``fd`` of ``pid``."""
    pfd = pidfd_open(pid)
    try:
        ours = pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)
    r = w = -1
    try:
        size = fcntl.fcntl(ours, F_GETPIPE_SZ)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if fcntl.fcntl(w, F_GETPIPE_SZ) < size:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        n = tee(ours, w, size)
        data = os.read(r, n) if n else b""
        return PipeData(ino=ino, size=size, data=data)
    finally:
        for x in (ours, r, w):
            if x >= 0:
                os.close(x)


def empty(ino: int, size: int = DEFAULT_SIZE) -> PipeData:
    """A pipe nobody can read from: its bytes can never be seen, keep none."""
    return PipeData(ino=ino, size=size)


def create(p: PipeData) -> tuple[int, int]:
    """A pipe of ours like the saved one: same capacity, same unread bytes."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if p.size != fcntl.fcntl(w, F_GETPIPE_SZ):
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, p.size)
            except OSError as e:
                raise RestoreError(f"cannot give pipe:[{p.ino}] its capacity of {p.size} bytes: "
                                   f"{e.strerror}", "raise /proc/sys/fs/pipe-max-size or run as root") from None
        if len(p.data) > fcntl.fcntl(w, F_GETPIPE_SZ):
            raise RestoreError(f"pipe:[{p.ino}] holds more bytes than its capacity")
        if p.data:
            os.set_blocking(w, False)
            os.write(w, p.data)
            os.set_blocking(w, True)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w
