"""signalfd: the set of signals it accepts, and its flags.

The mask is in fdinfo (sigmask, hex, bit N-1 for signal N).  The signals
themselves are pending on the task (or its process) and are saved with it;
a signalfd reads whatever is pending for the task that reads it, so one
made by lcr and inherited by the task works as the original did.
Restore: signalfd(-1, mask, SFD_CLOEXEC) in lcr."""
from __future__ import annotations

import ctypes
import os

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import SignalfdState
from linuxcr.sys.syscalls import libc

SFD_CLOEXEC = os.O_CLOEXEC
SIGSET_WORDS = 1024 // 64          # glibc's sigset_t: 128 bytes, the kernel reads the first 8


class Signalfd:
    name = "signalfd"

    def matches(self, ctx) -> bool:
        return ctx.link == "anon_inode:[signalfd]"

    def reason(self, ctx) -> str | None:
        try:
            int(ctx.info.extra["sigmask"], 16)
        except (KeyError, ValueError):
            return "signalfd: its signal mask is not shown in fdinfo"
        return None

    def dump(self, ctx) -> SignalfdState:
        return SignalfdState(mask=int(ctx.info.extra["sigmask"], 16))

    def open(self, state: SignalfdState, flags: int) -> int:
        mask = (ctypes.c_uint64 * SIGSET_WORDS)(state.mask)
        fd = libc.signalfd(-1, ctypes.byref(mask), SFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot create a signalfd for mask 0x{state.mask:x}: {os.strerror(e)}")
        os.set_blocking(fd, not flags & os.O_NONBLOCK)
        return fd


KIND = Signalfd()
