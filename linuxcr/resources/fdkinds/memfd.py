"""memfd (memfd_create): name, content, size, mode, seals; the description's
offset (its flags are in FileDesc).

Dump: the content is read as for unlinked files (unlinked.py: pread through
a private read-only open, holes skipped, at most MAX_CONTENT bytes of data);
seals with F_GET_SEALS on our copy.  Restore: memfd_create(name,
MFD_ALLOW_SEALING), content, ftruncate; mode and seals last (memory.open_shm
-> OBJECTS.finish(), once every description and mapping has its fd).  Every
fd and mapping of one memfd share one new memfd (keyed by the saved
(st_dev, st_ino)); each description is opened through /proc/self/fd.
hugetlbfs memfds (MFD_HUGETLB) are refused."""
from __future__ import annotations

import fcntl
import os

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import FileContent, MemfdState
from linuxcr.resources.fdkinds.unlinked import (
    DELETED, OBJECTS, apply_attrs, content_reason, dump_content, reopen,
)

PREFIX = "/memfd:"
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = \
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20
WRITE_SEALS = F_SEAL_WRITE | F_SEAL_FUTURE_WRITE
MFD_CLOEXEC, MFD_ALLOW_SEALING = 1, 2
PAGE = os.sysconf("SC_PAGE_SIZE")


def name_of(path: str) -> str:
    """'/memfd:NAME (deleted)' or '/memfd:NAME' (maps) -> NAME."""
    path = path[: -len(DELETED)] if path.endswith(DELETED) else path
    return path[len(PREFIX):]


def seals_of(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return 0


def _seal(fd: int, c: FileContent, seals: int, name: str) -> None:
    apply_attrs(fd, c)          # before F_SEAL_EXEC forbids chmod
    if seals:
        try:
            fcntl.fcntl(fd, F_ADD_SEALS, seals)
        except OSError as e:
            raise RestoreError(f"cannot seal memfd {name!r} (seals 0x{seals:x}): {e.strerror}") from None


def make(state: MemfdState) -> int:
    """lcr's fd of the new memfd (made once per saved memfd per restart)."""
    def create() -> int:
        try:
            return os.memfd_create(state.name, MFD_CLOEXEC | MFD_ALLOW_SEALING)
        except (OSError, ValueError) as e:
            raise RestoreError(f"cannot create memfd {state.name!r}: {e}") from None
    return OBJECTS.get(state.content, create,
                       lambda fd: _seal(fd, state.content, state.seals, state.name))


class Memfd:
    name = "memfd"

    def matches(self, ctx) -> bool:
        return ctx.link.startswith(PREFIX) and ctx.link.endswith(DELETED)

    def reason(self, ctx) -> str | None:
        what = f"memfd {name_of(ctx.link)!r}"
        if ctx.st.st_blksize != PAGE:
            return f"{what}: hugetlbfs memfds (MFD_HUGETLB) are not supported"
        return content_reason(ctx, what)

    def dump(self, ctx) -> MemfdState:
        return MemfdState(name=name_of(ctx.link), content=dump_content(ctx),
                          seals=seals_of(ctx.grab()), pos=max(ctx.info.pos, 0))

    def open(self, state: MemfdState, flags: int) -> int:
        return reopen(make(state), flags, state.pos, f"memfd {state.name!r}")


KIND = Memfd()
