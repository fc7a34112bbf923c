"""An fd of shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, which shows
as "/dev/zero (deleted)"), opened through /proc/PID/map_files: the same
object the mapping uses, memfd-like.  (Once restored, the object is lcr's
memfd "lcr-shm", as memory.open_shm makes it: that name is claimed here too.)

Dump: a shared mapping of the object in the holder (maps: same inode).
When there is one, nothing else: memory.py saves the pages with the mapping.
When the holder maps it no more, its content (as unlinked.py reads files).
Restore: with a mapping, inside the task once its memory and fds are in
place (after_install), open /proc/self/map_files/START-END with the saved
flags (root: CAP_CHECKPOINT_RESTORE, which the program also needed to
open it), seek, and put it on the saved fd number; the fd and the mapping
share the restored object again.  Without a mapping: a new memfd with the
content, shared by every description of the same saved object.
"""
from __future__ import annotations

import os
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import ShmfdState
from linuxcr.procfs import read_maps
from linuxcr.resources.fdkinds.unlinked import (
    DELETED, OBJECTS, REOPEN_FLAGS, apply_attrs, content_reason, dump_content, reopen,
)

NAMES = ("/dev/zero" + DELETED, "/memfd:lcr-shm" + DELETED)
F_GETFD, FD_CLOEXEC, O_CLOEXEC, SEEK_SET = 1, 1, 0o2000000, 0


def _mapping(pid: int, ino: int) -> tuple[int, int] | None:
    for m in read_maps(pid):
        if m.inode == ino and m.perms[3] == "s" and m.path in ("/dev/zero", "/memfd:lcr-shm"):
            return m.start, m.end
    return None


class Shmfd:
    name = "shmfd"

    def matches(self, ctx) -> bool:
        if ctx.link not in NAMES or not stat.S_ISREG(ctx.st.st_mode):
            return False
        # a memfd the program itself named lcr-shm and never mapped is a memfd
        return ctx.link == NAMES[0] or _mapping(ctx.pid, ctx.st.st_ino) is not None

    def reason(self, ctx) -> str | None:
        if _mapping(ctx.pid, ctx.st.st_ino) is not None:
            return None
        return content_reason(ctx, "shared anonymous memory (/dev/zero) no longer mapped")

    def dump(self, ctx) -> ShmfdState:
        m = _mapping(ctx.pid, ctx.st.st_ino)
        if m is not None:
            return ShmfdState(start=m[0], end=m[1], pos=max(ctx.info.pos, 0))
        return ShmfdState(content=dump_content(ctx), pos=max(ctx.info.pos, 0))

    def open(self, state: ShmfdState, flags: int) -> int:
        if state.content is None:       # the real one is opened in the task (after_install)
            return os.open("/", os.O_PATH | O_CLOEXEC)

        def create() -> int:
            return os.memfd_create("lcr-shm", os.MFD_CLOEXEC)
        obj = OBJECTS.get(state.content, create, lambda fd: apply_attrs(fd, state.content))
        return reopen(obj, flags, state.pos, "shared anonymous memory")

    def after_install(self, t, arena, fd: int, state: ShmfdState, table) -> None:
        if state.content is not None:
            return
        d = table[fd]
        path = f"/proc/self/map_files/{state.start:x}-{state.end:x}"
        new = arena.open(path, d.flags & REOPEN_FLAGS, what=f"fd {fd}, shared anonymous memory")
        try:
            if state.pos:
                t.syscall("lseek", new, state.pos, SEEK_SET)
            cloexec = t.syscall("fcntl", fd, F_GETFD) & FD_CLOEXEC
            t.syscall("dup3", new, fd, O_CLOEXEC if cloexec else 0)
        except OSError as e:
            raise RestoreError(f"fd {fd}: cannot put back shared anonymous memory: {e.strerror}") from None
        finally:
            t.syscall("close", new)


KIND = Shmfd()
