"""Open files: regular files, directories and harmless character devices,
with fd number, flags, offset, close-on-exec and shared descriptions (dup);
plus the working directory and root."""
from __future__ import annotations

import errno
import os
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.schema import OpenFile
from linuxcr.procfs import list_fds, read_fd_link, read_fdinfo
from linuxcr.remote.task import Arena, Tracee
from linuxcr.sys.syscalls import kcmp_file

O_CLOEXEC = 0o2000000
# Flags that open() takes back; creation flags are not in fdinfo anyway.
REOPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME |
                os.O_SYNC | os.O_DSYNC | os.O_DIRECTORY | os.O_LARGEFILE | os.O_PATH)
SAFE_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}


def _describe(pid: int, fd: int) -> tuple[str, str | None, str]:
    """(kind, reason-if-unsupported, link target) of one fd."""
    link = read_fd_link(pid, fd)
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return "?", f"fd {fd}: {link}: vanished while being inspected", link
    mode = st.st_mode
    if link.endswith(" (deleted)") and link.startswith("/"):
        return "reg", f"fd {fd}: {link}: open files that were unlinked are not supported yet", link
    if stat.S_ISREG(mode):
        return "reg", None, link
    if stat.S_ISDIR(mode):
        return "dir", None, link
    if stat.S_ISCHR(mode):
        if link in SAFE_DEVICES:
            return "chr", None, link
        if link.startswith(("/dev/pts/", "/dev/tty")):
            return "chr", (f"fd {fd}: terminal {link}: terminals are not supported yet; start the "
                           "program with its input and output redirected to files"), link
        return "chr", f"fd {fd}: character device {link}: devices are not saved", link
    if link.startswith("pipe:"):
        return "pipe", f"fd {fd}: {link}: pipes are not supported yet", link
    if link.startswith("socket:"):
        return "socket", f"fd {fd}: {link}: sockets are not supported yet", link
    if link.startswith("anon_inode:"):
        return "anon", f"fd {fd}: {link[11:]}: this kind of file is not supported yet", link
    if stat.S_ISFIFO(mode):
        return "fifo", f"fd {fd}: FIFO {link}: named pipes are not supported yet", link
    return "?", f"fd {fd}: {link}: unsupported kind of file", link


def check(pid: int) -> list[str]:
    reasons = []
    for fd in list_fds(pid):
        try:
            _kind, reason, _ = _describe(pid, fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if reason:
            reasons.append(reason)
    return reasons


def dump(pid: int) -> list[OpenFile]:
    out: list[OpenFile] = []
    for fd in list_fds(pid):
        kind, reason, link = _describe(pid, fd)
        if reason:
            raise RestoreError(reason)  # check() runs first; this is a race
        info = read_fdinfo(pid, fd)
        dup_of = next((o.fd for o in out if o.dup_of is None and kcmp_file(pid, pid, o.fd, fd)), None)
        out.append(OpenFile(fd=fd, kind=kind, path=link, flags=info.flags & ~O_CLOEXEC,
                            pos=info.pos, cloexec=bool(info.flags & O_CLOEXEC), dup_of=dup_of))
    return out


def restore(t: Tracee, arena: Arena, files: list[OpenFile]) -> None:
    """Reopen every fd at its number; the task has no fds when this starts."""
    for f in files:
        dup_flags = O_CLOEXEC if f.cloexec else 0
        if f.dup_of is not None:
            t.syscall("dup3", f.dup_of, f.fd, dup_flags)
            continue
        tmp = arena.open(f.path, f.flags & REOPEN_FLAGS, what=f"fd {f.fd}")
        if tmp != f.fd:
            t.syscall("dup3", tmp, f.fd, dup_flags)
            t.syscall("close", tmp)
        elif not f.cloexec:
            t.syscall("fcntl", f.fd, 2, 0)  # F_SETFD: clear the O_CLOEXEC arena.open set
        if f.kind in ("reg", "dir") and f.pos:
            try:
                t.syscall("lseek", f.fd, f.pos, os.SEEK_SET)
            except OSError as e:
                if e.errno != errno.ESPIPE:
                    raise RestoreError(f"fd {f.fd}: cannot seek {f.path} to {f.pos}: {e.strerror}") from None


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
