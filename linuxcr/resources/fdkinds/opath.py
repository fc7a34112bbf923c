"""O_PATH descriptors: a place in the file system held without opening the
object (no read, no write, no side effect), often with O_NOFOLLOW on a
symbolic link, or on a socket file, a FIFO or a device.

Dump: the path, the type of the object (S_IFMT of its stat) and whether the
fd names a symbolic link itself (O_NOFOLLOW: the fd's stat is a link).
Restore: open(path, O_PATH [| O_NOFOLLOW] [| O_DIRECTORY]) in lcr, then the
object found must be of the saved type.  An O_PATH fd cannot take fcntl
F_SETFL (EBADF): nothing but the open flags is applied.

An O_PATH fd on a file that was unlinked is refused (nothing is left to
open by name)."""
from __future__ import annotations

import os
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import OpathState
from linuxcr.resources.fdkinds.unlinked import DELETED, O_CLOEXEC

O_PATH = os.O_PATH
TYPES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link",
         stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
         stat.S_IFSOCK: "socket file"}


def _type_name(mode: int) -> str:
    return TYPES.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")


class Opath:
    name = "opath"

    def matches(self, ctx) -> bool:
        return bool(ctx.info.flags & O_PATH)

    def reason(self, ctx) -> str | None:
        if not ctx.link.startswith("/"):
            return f"O_PATH descriptor of {ctx.link}: only paths in the file system are restored"
        if ctx.link.endswith(DELETED):
            return (f"O_PATH descriptor of {ctx.link}: the {_type_name(ctx.st.st_mode)} was "
                    "deleted, there is nothing left to open by name; close it before the checkpoint")
        return None

    def dump(self, ctx) -> OpathState:
        return OpathState(path=ctx.link, ftype=stat.S_IFMT(ctx.st.st_mode),
                          nofollow=stat.S_ISLNK(ctx.st.st_mode))

    def open(self, state: OpathState, flags: int) -> int:
        how = O_PATH | O_CLOEXEC | (flags & os.O_DIRECTORY)
        if state.nofollow:
            how |= os.O_NOFOLLOW
        try:
            fd = os.open(state.path, how)
        except OSError as e:
            raise RestoreError(f"cannot open {state.path} (an O_PATH descriptor): {e.strerror}",
                               "it must exist at the same path on this machine") from None
        got = stat.S_IFMT(os.fstat(fd).st_mode)
        if got != state.ftype:
            os.close(fd)
            raise RestoreError(f"{state.path} is now a {_type_name(got)}, it was a "
                               f"{_type_name(state.ftype)} (O_PATH descriptor)",
                               "the file system changed since the checkpoint")
        return fd


KIND = Opath()
