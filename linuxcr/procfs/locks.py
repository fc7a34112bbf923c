"""Parser for file-lock lines: /proc/locks and the ``lock:`` lines of
/proc/PID/fdinfo/FD (fs/locks.c lock_get_status)::

    5: FLOCK  ADVISORY  WRITE 4720 fe:00:2147776 0 EOF
    4: POSIX  ADVISORY  WRITE 4720 fe:00:2147777 10 29
    2: OFDLCK ADVISORY  WRITE -1 fe:00:2147778 0 4
    1: LEASE  ACTIVE    READ 4720 fe:00:2147780 0 EOF
    1: -> FLOCK  ADVISORY  WRITE 4811 fe:00:2147776 0 EOF     (a waiter)

Fields: kind (FLOCK, POSIX, OFDLCK, ACCESS, LEASE, DELEG, UNKNOWN), mode
(ADVISORY, MANDATORY on kernels before 5.15, ACTIVE/BREAKING/BREAKER for
leases, *NOINODE*), type (READ, WRITE, UNLCK), pid (-1 for OFD locks, 0 when
not visible in /proc's pid namespace), major:minor:inode of the file
(``<none>:0`` without an inode), first and last byte (inclusive, or EOF).

An fdinfo file lists the locks set through that open file whose owner is
this process (POSIX) or this open file description (FLOCK, OFDLCK, LEASE).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._text import as_text, lines, read_bytes
from .fdinfo import FdInfo


@dataclass(frozen=True)
class LockEntry:
    id: int
    kind: str                     # FLOCK | POSIX | OFDLCK | LEASE | DELEG | ACCESS | UNKNOWN
    mode: str                     # ADVISORY | MANDATORY | ACTIVE | BREAKING | BREAKER | *NOINODE*
    type: str                     # READ | WRITE | UNLCK
    pid: int
    dev: tuple[int, int] | None   # (major, minor) of the file system; None: no inode
    ino: int
    start: int
    end: int | None               # last byte, inclusive; None: to the end of the file (EOF)
    blocked: bool = False         # a waiter ("->"), not a held lock

    @property
    def length(self) -> int:
        """As in struct flock: 0 means up to the end of the file."""
        return 0 if self.end is None else self.end - self.start + 1


def parse_lock_line(line: str) -> LockEntry:
    """One line, with or without the ``lock:`` key of fdinfo; ValueError if malformed."""
    s = line.strip()
    if s.startswith("lock:"):
        s = s[5:].strip()
    head, sep, rest = s.partition(":")
    toks = rest.split()
    try:
        if not sep:
            raise ValueError("no id")
        blocked = bool(toks) and toks[0] == "->"
        if blocked:
            toks = toks[1:]
        if len(toks) != 7:
            raise ValueError(f"{len(toks)} fields")
        kind, mode, typ, pid, where, start, end = toks
        majmin, _, ino = where.rpartition(":")
        if majmin == "<none>":
            dev = None
        else:
            maj, _, mnr = majmin.partition(":")
            dev = (int(maj, 16), int(mnr, 16))
        return LockEntry(id=int(head), kind=kind, mode=mode, type=typ, pid=int(pid), dev=dev,
                         ino=int(ino), start=int(start), end=None if end == "EOF" else int(end),
                         blocked=blocked)
    except ValueError as e:
        raise ValueError(f"bad lock line {line!r}: {e}") from None


def parse_locks(text: str | bytes) -> list[LockEntry]:
    """All of /proc/locks, waiters included (``blocked``)."""
    return [parse_lock_line(ln) for ln in lines(as_text(text))]


def fdinfo_locks(info: FdInfo) -> list[LockEntry]:
    """The locks an fdinfo file lists for its fd."""
    return [parse_lock_line(v) for v in info.values("lock")]


def read_locks() -> list[LockEntry]:
    return parse_locks(read_bytes("/proc/locks"))
