"""eventfd: counter and flags.

The counter is read from fdinfo (eventfd-count): reading the fd would
consume it.  Restore: eventfd(0) in lcr, then write() the count back."""
from __future__ import annotations

import os

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import EventfdState
from linuxcr.sys.syscalls import libc

EFD_SEMAPHORE = 1
EFD_NONBLOCK = os.O_NONBLOCK
EFD_CLOEXEC = os.O_CLOEXEC


class Eventfd:
    name = "eventfd"

    def matches(self, ctx) -> bool:
        return ctx.link == "anon_inode:[eventfd]"

    def reason(self, ctx) -> str | None:
        return None

    def dump(self, ctx) -> EventfdState:
        info = ctx.info.extra
        return EventfdState(count=int(info.get("eventfd-count", "0"), 16),
                            semaphore=info.get("eventfd-semaphore", "0").strip() == "1")

    def open(self, state: EventfdState, flags: int) -> int:
        fd = libc.eventfd(0, EFD_CLOEXEC | (EFD_SEMAPHORE if state.semaphore else 0))
        if fd < 0:
            raise RestoreError("cannot create an eventfd")
        if state.count:
            os.write(fd, state.count.to_bytes(8, "little"))
        os.set_blocking(fd, not flags & os.O_NONBLOCK)
        return fd


KIND = Eventfd()
