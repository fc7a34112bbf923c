"""Image files: where an image is written to and read from.

An image written to a path is created unnamed (O_TMPFILE) or under a
temporary name and gets its name only when complete; reading opens it.
Both are used by the API, the agent (writeback) and the periodic loop.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from contextlib import contextmanager
from typing import IO, Callable, Iterator, Union

from linuxcr import faults
from linuxcr.errors import ImageError, ImageWriteError

Target = Union[int, str, os.PathLike, IO[bytes]]


@contextmanager
def output_image(target: Target, *, overwrite: bool = False
                 ) -> Iterator[tuple[int, str, Callable[[], None]]]:
    """fd to write to, its name, and the commit step (naming the file).

    Files are written unnamed (O_TMPFILE) or under a temporary name, and get
    their name only once complete: a failed checkpoint never leaves
    something that looks like an image.  An existing regular file is
    refused unless ``overwrite`` (then replaced atomically at commit)."""
    if not overwrite and isinstance(target, (str, os.PathLike)) \
            and os.path.isfile(os.fspath(target)):
        raise ImageWriteError(f"{os.fspath(target)} exists", "give --force to replace it")
    if isinstance(target, int):
        yield target, f"fd {target}", lambda: None
        return
    if hasattr(target, "fileno"):
        target.flush()  # type: ignore[union-attr]
        yield target.fileno(), getattr(target, "name", "image"), lambda: None  # type: ignore[union-attr]
        return
    path = os.fspath(target)
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as e:
        raise ImageWriteError(f"cannot write {path}: {e.strerror}") from None
    if special:   # a FIFO, a device, a socket file: write straight into it
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageWriteError(f"cannot open {path}: {e.strerror}") from None
        try:
            yield fd, path, lambda: None
        finally:
            os.close(fd)
        return
    # An unnamed file (O_TMPFILE) given its name only once complete: if lcr
    # dies (even by SIGKILL) nothing is left.  Filesystems without O_TMPFILE
    # get a visible temporary name instead, removed on every error.
    tmp = f"{path}.lcr-partial-{os.getpid()}"
    named: str | None = None
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise ImageWriteError(f"cannot create {path}: {e.strerror}") from None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e2:
            raise ImageWriteError(f"cannot create {path}: {e2.strerror}") from None
        named = tmp
    done = False

    def commit() -> None:
        nonlocal done
        faults.point("dump.rename")
        try:
            if named is not None:
                os.rename(named, path)
            elif not link_fd(fd, path):      # path exists: replace it atomically
                remove(tmp)
                if not link_fd(fd, tmp):
                    raise FileExistsError(errno.EEXIST, "exists", tmp)
                os.rename(tmp, path)
        except OSError as e:
            remove(tmp)
            raise ImageWriteError(f"cannot give {path} its name: {e.strerror}") from None
        done = True
    try:
        yield fd, path, commit
    finally:
        os.close(fd)
        if not done and named is not None:
            remove(named)


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def link_fd(fd: int, path: str) -> bool:
    """linkat() an O_TMPFILE file to path; False if path exists."""
    from linuxcr.sys.syscalls import libc
    if libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(path),
                   _AT_SYMLINK_FOLLOW) == 0:
        return True
    e = ctypes.get_errno()
    if e == errno.EEXIST:
        return False
    raise OSError(e, os.strerror(e), path)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def input_image(source: Target) -> Iterator[tuple[int, str]]:
    if isinstance(source, int):
        yield source, f"fd {source}"
        return
    if hasattr(source, "fileno"):
        yield source.fileno(), getattr(source, "name", "image")  # type: ignore[union-attr]
        return
    path = os.fspath(source)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image {path}: {e.strerror}") from None
    try:
        yield fd, path
    finally:
        os.close(fd)


def owner(fd: int) -> int | None:
    """Who owns the image file (None for pipes and sockets: nobody to ask)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_uid if stat.S_ISREG(st.st_mode) else None
