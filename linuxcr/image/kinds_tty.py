"""Saved state of pseudo-terminals (resources/fdkinds/pty.py): part of the
image schema, declarations only (appended to KIND_STATES in kinds.py)."""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
Index = Annotated[int, Meta(ge=0, le=1 << 20)]
PidNum = Annotated[int, Meta(ge=0, le=1 << 22)]
MAX_QUEUED = 1 << 20      # bytes waiting in one direction (a tty buffers 4 KiB-64 KiB)


class PtmxState(Struct, tag="ptmx", forbid_unknown_fields=True):
    """The master end of a pty pair, and the terminal's settings (which live
    on the slave side; the master's ioctls reach them)."""
    index: Index                               # /dev/pts/<index>
    iflag: U32 = 0
    oflag: U32 = 0
    cflag: U32 = 0
    lflag: U32 = 0
    ispeed: U32 = 0
    ospeed: U32 = 0
    cc: Annotated[bytes, Meta(max_length=64)] = b""
    rows: Annotated[int, Meta(ge=0, le=65535)] = 0
    cols: Annotated[int, Meta(ge=0, le=65535)] = 0
    xpixel: Annotated[int, Meta(ge=0, le=65535)] = 0
    ypixel: Annotated[int, Meta(ge=0, le=65535)] = 0
    packet: bool = False                       # TIOCPKT
    locked: bool = False                       # TIOCSPTLCK: the slave cannot be opened
    exclusive: bool = False                    # TIOCEXCL
    to_slave: Annotated[bytes, Meta(max_length=MAX_QUEUED)] = b""    # typed, not read yet
    to_master: Annotated[bytes, Meta(max_length=MAX_QUEUED)] = b""   # written, not read yet


class PtsState(Struct, tag="pts", forbid_unknown_fields=True):
    """A slave end: /dev/pts/<index>.  ``ctty_sid`` (as the tree's processes
    number it) is the session whose controlling terminal it is, ``fg_pgrp``
    its foreground process group.  ``external``: the master is outside the
    tree (the terminal lcr was called from: --shell-job)."""
    index: Index
    ctty_sid: PidNum = 0
    fg_pgrp: PidNum = 0
    external: bool = False
