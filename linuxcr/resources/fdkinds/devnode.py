"""An open device node whose name was removed (its fd shows
"/path (deleted)"): only the memory devices (null, zero, full, random,
urandom: major 1), which have no state to lose.

Dump: the device number, block or character, mode, owner, the offset.
Restore (needs CAP_MKNOD, so root): mknod beside the old path (another
name if taken; when that file system forbids devices (nodev), in /dev),
open it with the saved flags, unlink it at once, seek.  Each description
gets its own node: a memory device holds nothing they could share.
Any other unlinked device is refused: lcr does not save device state."""
from __future__ import annotations

import errno
import os
import stat

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import DevnodeState
from linuxcr.resources.fdkinds.unlinked import DELETED, O_CLOEXEC, REOPEN_FLAGS, free_names

MEM_DEVICES = {(1, 3): "null", (1, 5): "zero", (1, 7): "full", (1, 8): "random", (1, 9): "urandom"}


def _what(st: os.stat_result) -> str:
    kind = "block" if stat.S_ISBLK(st.st_mode) else "character"
    return f"{kind} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


class Devnode:
    name = "devnode"

    def matches(self, ctx) -> bool:
        return ctx.link.startswith("/") and ctx.link.endswith(DELETED) and \
            (stat.S_ISCHR(ctx.st.st_mode) or stat.S_ISBLK(ctx.st.st_mode))

    def reason(self, ctx) -> str | None:
        dev = (os.major(ctx.st.st_rdev), os.minor(ctx.st.st_rdev))
        if stat.S_ISBLK(ctx.st.st_mode) or dev not in MEM_DEVICES:
            return (f"{_what(ctx.st)} {ctx.link}: it was unlinked and devices are not saved (only "
                    "the memory devices null, zero, full, random, urandom are made again); keep "
                    "its name in the file system (or close it) while checkpointing")
        return None

    def dump(self, ctx) -> DevnodeState:
        st = ctx.st
        return DevnodeState(path=ctx.link[: -len(DELETED)], rdev=st.st_rdev,
                            block=stat.S_ISBLK(st.st_mode), mode=stat.S_IMODE(st.st_mode),
                            uid=st.st_uid, gid=st.st_gid, pos=max(ctx.info.pos, 0))

    def open(self, state: DevnodeState, flags: int) -> int:
        dev = (os.major(state.rdev), os.minor(state.rdev))
        if state.block or dev not in MEM_DEVICES:
            raise RestoreError(f"unlinked device {state.path} ({dev[0]}:{dev[1]}) is not a memory "
                               "device: the image was not made by lcr checkpoint")
        fd = self._make(state, flags, os.path.dirname(state.path) or "/")
        try:
            os.fchmod(fd, state.mode)
            try:
                os.fchown(fd, state.uid, state.gid)
            except OSError:
                pass
            if state.pos:
                os.lseek(fd, state.pos, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise RestoreError(f"cannot restore unlinked device {state.path}: {e.strerror}") from None
        return fd

    def _make(self, state: DevnodeState, flags: int, where: str) -> int:
        """mknod + open + unlink beside the old path, else in /dev (nodev mounts)."""
        for d in dict.fromkeys([where, "/dev"]):
            base = os.path.join(d, os.path.basename(state.path))
            for name in free_names(base):
                try:
                    os.mknod(name, stat.S_IFCHR | 0o600, state.rdev)
                except FileExistsError:
                    continue
                except FileNotFoundError:
                    break           # the directory is gone: try /dev
                except OSError as e:
                    raise RestoreError(f"cannot make unlinked device {state.path} again "
                                       f"(mknod): {e.strerror}", "restarting it needs root "
                                       "(CAP_MKNOD)") from None
                try:
                    return os.open(name, (flags & REOPEN_FLAGS) | O_CLOEXEC | os.O_NOCTTY)
                except OSError as e:
                    if e.errno != errno.EACCES or d == "/dev":
                        raise RestoreError(f"cannot open unlinked device {state.path} made "
                                           f"again: {e.strerror}") from None
                    break           # nodev mount: try /dev
                finally:
                    os.unlink(name)
        raise RestoreError(f"cannot make unlinked device {state.path} again: no place for it")


KIND = Devnode()
