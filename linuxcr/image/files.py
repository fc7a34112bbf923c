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
from contextvars import ContextVar
from typing import IO, Callable, Iterator, Union

from linuxcr import faults
from linuxcr.errors import ImageError, ImageWriteError
from linuxcr.image import source

Target = Union[int, str, os.PathLike, IO[bytes]]


@contextmanager
def output_image(target: Target, *, overwrite: bool = False
                 ) -> Iterator[tuple[int, str, Callable[[], None]]]:
    """fd to write to, its name, and the commit step (naming the file).

    Files are written unnamed (O_TMPFILE) or under a temporary name, and get
    their name only once complete: a failed checkpoint never leaves
    something that looks like an image.  A path is checked first
    (check_output): no symlink, FIFO, device or file someone else controls.
    An existing regular file is refused unless ``overwrite`` (then replaced
    atomically at commit)."""
    if isinstance(target, int):
        yield target, f"fd {target}", lambda: None
        return
    if hasattr(target, "fileno"):
        target.flush()  # type: ignore[union-attr]
        yield target.fileno(), getattr(target, "name", "image"), lambda: None  # type: ignore[union-attr]
        return
    path = os.fspath(target)
    dest = check_output(path)        # who controls the path: refused first, --force or not
    if not overwrite and os.path.isfile(path):
        raise ImageWriteError(f"{path} exists", "give --force to replace it")
    dirfd = _open_dir(dest)
    try:
        if dest.magic or (dest.entry is not None and _special(dest.entry)):
            with _open_special(dest, dirfd) as fd:
                yield fd, path, lambda: None
            return
        with _new_file(dest, dirfd) as got:
            yield got
    finally:
        os.close(dirfd)


# --- where -o may write (docs/guarantees.md, "Writing an image") -----------------
#
# With me = the caller's uid and "ours" = {me, root}:
# - every symlink on the way must be owned by one of ours and sit in a
#   directory others may not write without the sticky bit (fs.protected_symlinks
#   is not relied upon: it may be off, and root is subject to it only in sticky dirs);
# - the directory holding the final name must not be writable by others
#   without the sticky bit;
# - an existing regular file is replaced (rename into place, never written
#   into); in a sticky directory only when it is the caller's own;
# - an existing FIFO, socket or device is written into only when one of ours
#   owns it (users do `-o /dev/stdout`, `-o /dev/null`, `-o FIFO` of their own);
#   a /proc magic link (/dev/stdout -> /proc/self/fd/1) only when the caller's;
# - a new name is created by linkat() of an unnamed file (fails if the name
#   appeared meanwhile: then renamed into place) or O_EXCL; every step is
#   relative to the directory fd checked, never through a path again.

def _special(st: os.stat_result) -> bool:
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    return ("a FIFO" if stat.S_ISFIFO(m) else "a socket" if stat.S_ISSOCK(m) else
            "a device" if stat.S_ISCHR(m) or stat.S_ISBLK(m) else
            "a symlink" if stat.S_ISLNK(m) else "a directory" if stat.S_ISDIR(m) else "a file")


def check_output(path: str) -> source.Resolved:
    """Refuse, before any process is touched, a path -o must not write through."""
    me = os.geteuid()
    ours = (me, 0)
    try:
        dest = source.resolve(path)
    except OSError as e:
        raise ImageWriteError(f"cannot write {path}: {e.strerror}") from None
    for link in dest.links:
        if link.uid not in ours:
            raise ImageWriteError(f"refusing to write {path}: it goes through the symlink "
                                  f"{link.path} owned by uid {link.uid}",
                                  "lcr follows only your own (or root's) links; give the real path")
        if link.dir_open:
            raise ImageWriteError(f"refusing to write {path}: the symlink {link.path} sits in a "
                                  "directory others may write", "give the real path")
    if dest.magic:
        if dest.entry is not None and dest.entry.st_uid != me:
            raise ImageWriteError(f"refusing to write {path}: it is an open file of uid "
                                  f"{dest.entry.st_uid}")
        return dest
    if source.open_dir(dest.dir_st):
        raise ImageWriteError(f"refusing to write into {dest.dir}: others may write it and it has "
                              "no sticky bit (they could swap the image)",
                              "write into a directory only you (or a sticky one) control")
    st = dest.entry
    if st is None:
        return dest
    if stat.S_ISDIR(st.st_mode):
        raise ImageWriteError(f"cannot write {path}: it is a directory")
    if _special(st):
        if st.st_uid not in ours:
            raise ImageWriteError(f"refusing to write {path}: it is {_kind(st)} owned by uid "
                                  f"{st.st_uid} (the image would go to them)",
                                  "write to a file, or to a FIFO or device of yours")
        return dest
    if dest.dir_st.st_mode & stat.S_ISVTX and st.st_uid != me:
        raise ImageWriteError(f"refusing to replace {path}: it belongs to uid {st.st_uid} in the "
                              f"sticky directory {dest.dir}", "choose another name")
    return dest


def _open_dir(dest: source.Resolved) -> int:
    """The checked directory, held by fd: every later step is relative to it."""
    try:
        fd = os.open(dest.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageWriteError(f"cannot write {dest.path}: {e.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dest.dir_st.st_dev, dest.dir_st.st_ino):
        os.close(fd)
        raise ImageWriteError(f"refusing to write {dest.path}: {dest.dir} changed while it was "
                              "checked")
    return fd


@contextmanager
def _open_special(dest: source.Resolved, dirfd: int) -> Iterator[int]:
    """A FIFO, device or socket of ours, or the caller's open file: written into."""
    try:
        if dest.magic:
            fd = _own_fd(dest.final)
        else:
            fd = os.open(dest.name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW,
                         dir_fd=dirfd)
    except OSError as e:
        raise ImageWriteError(f"cannot open {dest.path}: {e.strerror}") from None
    try:
        if not dest.magic:
            st, want = os.fstat(fd), dest.entry
            assert want is not None
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                raise ImageWriteError(f"refusing to write {dest.path}: it changed while it was "
                                      "checked")
        yield fd
    finally:
        os.close(fd)


def _own_fd(final: str) -> int:
    """/proc/OURPID/fd/N (/dev/stdout): our own fd N, shared (its offset
    too: `lcr checkpoint -o /dev/stdout > FILE` writes as if to fd 1); any
    other magic link is opened through the kernel."""
    parts = final.split("/")
    if len(parts) == 5 and parts[:2] == ["", "proc"] and parts[2] == str(os.getpid()) \
            and parts[3] == "fd" and parts[4].isdigit():
        return os.dup(int(parts[4]))
    return os.open(final, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)


@contextmanager
def _new_file(dest: source.Resolved, dirfd: int) -> Iterator[tuple[int, str, Callable[[], None]]]:
    # An unnamed file (O_TMPFILE) given its name only once complete: if lcr
    # dies (even by SIGKILL) nothing is left.  Filesystems without O_TMPFILE
    # get a visible temporary name instead (O_EXCL), removed on every error.
    path, name = dest.path, dest.name
    tmp = f"{name}.lcr-partial-{os.getpid()}"
    named: str | None = None
    try:
        fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise ImageWriteError(f"cannot create {path}: {e.strerror}") from None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dirfd)
        except OSError as e2:
            raise ImageWriteError(f"cannot create {path}: {e2.strerror}") from None
        named = tmp
    done = False

    def commit() -> None:
        nonlocal done
        faults.point("dump.rename")
        try:
            if named is not None:
                _replace_check(dest, dirfd)
                os.rename(named, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            elif not link_fd(fd, name, dirfd):      # name exists: replace it atomically
                _replace_check(dest, dirfd)
                remove(tmp, dirfd)
                if not link_fd(fd, tmp, dirfd):
                    raise FileExistsError(errno.EEXIST, "exists", tmp)
                os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as e:
            remove(tmp, dirfd)
            raise ImageWriteError(f"cannot give {path} its name: {e.strerror}") from None
        done = True
    try:
        yield fd, path, commit
    finally:
        os.close(fd)
        if not done and named is not None:
            remove(named, dirfd)


def _replace_check(dest: source.Resolved, dirfd: int) -> None:
    """What the name holds now may be replaced (it may have appeared since
    check_output: a rename replaces a symlink, FIFO or device without
    following it, but in a sticky directory another user's entry stays)."""
    try:
        st = os.stat(dest.name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ImageWriteError(f"cannot write {dest.path}: it is a directory")
    if dest.dir_st.st_mode & stat.S_ISVTX and st.st_uid != os.geteuid():
        raise ImageWriteError(f"refusing to replace {dest.path}: {_kind(st)} of uid {st.st_uid} "
                              f"appeared there in the sticky directory {dest.dir}",
                              "choose another name")


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def link_fd(fd: int, path: str, dirfd: int = _AT_FDCWD) -> bool:
    """linkat() an O_TMPFILE file to path (relative to dirfd); False if path exists."""
    from linuxcr.sys.syscalls import libc
    if libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), dirfd, os.fsencode(path),
                   _AT_SYMLINK_FOLLOW) == 0:
        return True
    e = ctypes.get_errno()
    if e == errno.EEXIST:
        return False
    raise OSError(e, os.strerror(e), path)


def remove(path: str, dirfd: int | None = None) -> None:
    """Clean-up: a name that cannot be removed (gone, or another user's in a
    sticky directory) is left; the step after it fails cleanly if it matters."""
    try:
        os.unlink(path, dir_fd=dirfd)
    except OSError:
        pass


@contextmanager
def input_image(src: Target) -> Iterator[tuple[int, str]]:
    if isinstance(src, int):
        name = f"fd {src}"
        opened(src, None, name)
        yield src, name
        return
    if hasattr(src, "fileno"):
        name = getattr(src, "name", "image")
        opened(src.fileno(), None, name)  # type: ignore[union-attr]
        yield src.fileno(), name  # type: ignore[union-attr]
        return
    path = os.fspath(src)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image {path}: {e.strerror}") from None
    try:
        opened(fd, path, path)
        yield fd, path
    finally:
        os.close(fd)


# --- who wrote what is read (image/source.py) ------------------------------------

_SOURCES: ContextVar[Callable[[source.Source], None] | None] = ContextVar(
    "linuxcr_image_sources", default=None)


@contextmanager
def watch_sources(report: Callable[[source.Source], None]) -> Iterator[None]:
    """Every image opened for reading in this context (the image, its
    parents) is reported with who could have written it."""
    token = _SOURCES.set(report)
    try:
        yield
    finally:
        _SOURCES.reset(token)


def opened(fd: int, path: str | None, name: str) -> None:
    """Report an image just opened (from ``path``, or an fd when None) to the
    watcher, if any.  Nothing is computed without one."""
    report = _SOURCES.get()
    if report is not None:
        report(source.source_of(fd, path, name))
