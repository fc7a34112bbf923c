"""Parser for /proc/PID/stat (proc(5), fields 1..52).

comm is printed raw between parentheses and may itself hold ')', spaces or even
newlines, so the only safe split is at the LAST ')'.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._text import as_text, proc_path, read_bytes


@dataclass(frozen=True)
class ProcStat:
    """All fields of /proc/PID/stat; trailing fields missing on old kernels are 0."""

    pid: int  # (1)
    comm: str  # (2) without the parentheses
    state: str  # (3)
    ppid: int = 0
    pgrp: int = 0
    session: int = 0
    tty_nr: int = 0
    tpgid: int = 0
    flags: int = 0
    minflt: int = 0  # (10)
    cminflt: int = 0
    majflt: int = 0
    cmajflt: int = 0
    utime: int = 0
    stime: int = 0
    cutime: int = 0
    cstime: int = 0
    priority: int = 0
    nice: int = 0
    num_threads: int = 0  # (20)
    itrealvalue: int = 0
    starttime: int = 0
    vsize: int = 0
    rss: int = 0
    rsslim: int = 0
    start_code: int = 0
    end_code: int = 0
    start_stack: int = 0
    kstkesp: int = 0
    kstkeip: int = 0  # (30)
    signal: int = 0
    blocked: int = 0
    sigignore: int = 0
    sigcatch: int = 0
    wchan: int = 0
    nswap: int = 0
    cnswap: int = 0
    exit_signal: int = 0
    processor: int = 0
    rt_priority: int = 0  # (40)
    policy: int = 0
    delayacct_blkio_ticks: int = 0
    guest_time: int = 0
    cguest_time: int = 0
    start_data: int = 0
    end_data: int = 0
    start_brk: int = 0
    arg_start: int = 0
    arg_end: int = 0
    env_start: int = 0  # (50)
    env_end: int = 0
    exit_code: int = 0


_INT_FIELDS = tuple(f.name for f in fields(ProcStat))[3:]


def parse_stat(text: str | bytes) -> ProcStat:
    """Parse /proc/PID/stat (also works for /proc/PID/task/TID/stat)."""
    text = as_text(text)
    open_, close = text.find("("), text.rfind(")")
    if open_ < 0 or close < open_:
        raise ValueError(f"no (comm) in stat: {text[:80]!r}")
    rest = text[close + 1 :].split()
    if not rest:
        raise ValueError("stat has no state field")
    try:
        pid = int(text[:open_])
        values = [int(v) for v in rest[1 : 1 + len(_INT_FIELDS)]]
    except ValueError as e:
        raise ValueError(f"bad stat contents: {e}") from None
    return ProcStat(pid, text[open_ + 1 : close], rest[0], **dict(zip(_INT_FIELDS, values)))


def read_stat(pid: int | str) -> ProcStat:
    return parse_stat(read_bytes(proc_path(pid, "stat")))
