"""A task's working directory and root directory.

Both are restored with paths as lcr sees them (/proc/PID/cwd and root):
the task changes its directory first, then its root, so a working
directory inside a chroot (shown with the chroot's path in front), or
outside it, is the same directory as before.

A working directory that was removed ("/path (deleted)"): lcr makes a
directory there again (like fdkinds/deleted_dir.py), the task enters it,
lcr gives it its mode and owner and removes it again: the task is left in
an empty deleted directory, as before.
"""
from __future__ import annotations

import contextlib
import os
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import DeletedDirState
from linuxcr.image.schema import Task
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources.fdkinds.unlinked import DELETED
from linuxcr.resources.fdkinds.deleted_dir import make_again


def dump_cwd_deleted(pid: int, cwd: str) -> DeletedDirState | None:
    if not cwd.endswith(DELETED):
        return None
    st = os.stat(f"/proc/{pid}/cwd")
    if not stat.S_ISDIR(st.st_mode):
        return None
    return DeletedDirState(path=cwd[: -len(DELETED)], mode=stat.S_IMODE(st.st_mode),
                           uid=st.st_uid, gid=st.st_gid)


def restore(t: Tracee, arena: Arena, task: Task) -> None:
    if task.cwd_deleted is not None:
        _enter_deleted(t, arena, task.cwd_deleted)
    else:
        _chdir(t, arena, task.cwd, task.cwd)
    if task.root != "/":
        try:
            t.syscall("chroot", arena.cstr(task.root))
        except OSError as e:
            raise RestoreError(f"cannot change root to {task.root}: {e.strerror}",
                               "restoring a chroot'ed process needs CAP_SYS_CHROOT") from None


def roll_back_cwd(t: Tracee, arena: Arena, task: Task) -> None:
    """A live task (rollback), its root directory the saved one still: back
    into the saved working directory.  The saved paths are lcr's: inside a
    chroot the task names the directory without the root in front."""
    if task.cwd_deleted is not None:
        if task.root != "/":
            raise RestoreError(f"working directory {task.cwd} not rolled back: it was removed, "
                               f"inside the root {task.root}")
        _enter_deleted(t, arena, task.cwd_deleted)
        return
    path = task.cwd
    if task.root != "/":
        top = task.root.rstrip("/")
        if path != top and not path.startswith(top + "/"):
            raise RestoreError(f"working directory {task.cwd} not rolled back: it is outside "
                               f"the process's root {task.root}")
        path = path[len(top):] or "/"
    _chdir(t, arena, path, task.cwd)


def _enter_deleted(t: Tracee, arena: Arena, st: DeletedDirState) -> None:
    """Made again where it was (or under a free name beside it), entered by
    the task by path (a task in a user namespace of its own cannot reach
    lcr's fds through /proc), given its mode and owner, removed."""
    name = make_again(st.path, 0o711, "removed working directory")
    try:
        os.chmod(name, 0o711)          # (umask) the task must get in whoever it is now
        _chdir(t, arena, name, st.path + DELETED)
        with contextlib.suppress(PermissionError):
            os.chown(name, st.uid, st.gid)
        os.chmod(name, st.mode)
    finally:
        os.rmdir(name)


def _chdir(t: Tracee, arena: Arena, path: str, shown: str) -> None:
    try:
        t.syscall("chdir", arena.cstr(path))
    except OSError as e:
        raise RestoreError(f"cannot enter working directory {shown}: {e.strerror}",
                           "it must exist at the same path on this machine") from None
