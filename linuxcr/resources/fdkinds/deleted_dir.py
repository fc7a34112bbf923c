"""An open directory that was removed (rmdir while a program still holds
it, shown as "/path (deleted)").  A removed directory is empty and can hold
no new entry, so its mode, owner and the fact that it is gone are all there
is to save.

Restore: lcr makes a directory at the old path (another name in the same
parent if that one is taken), opens it with the saved flags, applies mode
and owner, and removes it again: the fd names an empty deleted directory,
as before."""
from __future__ import annotations

import contextlib
import os
import secrets
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import DeletedDirState
from linuxcr.resources.fdkinds.unlinked import DELETED, O_CLOEXEC


class DeletedDir:
    name = "deleted_dir"

    def matches(self, ctx) -> bool:
        return ctx.link.startswith("/") and ctx.link.endswith(DELETED) and stat.S_ISDIR(ctx.st.st_mode)

    def reason(self, ctx) -> str | None:
        return None

    def dump(self, ctx) -> DeletedDirState:
        st = ctx.st
        return DeletedDirState(path=ctx.link[: -len(DELETED)], mode=stat.S_IMODE(st.st_mode),
                               uid=st.st_uid, gid=st.st_gid)

    def open(self, state: DeletedDirState, flags: int) -> int:
        name = make_again(state.path, 0o700, "deleted directory")
        try:
            fd = os.open(name, (flags & (os.O_ACCMODE | os.O_NONBLOCK | os.O_NOATIME | os.O_PATH))
                         | os.O_DIRECTORY | O_CLOEXEC)
            with contextlib.suppress(PermissionError):
                os.chown(name, state.uid, state.gid)
            os.chmod(name, state.mode)
        finally:
            os.rmdir(name)
        return fd


KIND = DeletedDir()


def make_again(path: str, mode: int, what: str) -> str:
    """A directory made where ``path`` was removed, or under a free name
    beside it; the caller gives it its mode and owner and removes it again
    (a deleted directory held open, a removed working directory:
    resources/fsroot.py)."""
    parent = os.path.dirname(path) or "/"
    base = os.path.basename(path)
    for name in [path] + [os.path.join(parent, f".{base[:200]}.lcr-{secrets.token_hex(4)}")
                          for _ in range(8)]:
        try:
            os.mkdir(name, mode)
            return name
        except FileExistsError:
            continue
        except OSError as e:
            raise RestoreError(f"cannot make the {what} {path} again: {e.strerror}",
                               f"directory {parent} must exist and be writable") from None
    raise RestoreError(f"cannot make the {what} {path} again: no free name in {parent}")
