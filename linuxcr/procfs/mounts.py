"""/proc/PID/mountinfo: the mounts a process sees (its mount namespace)."""
from __future__ import annotations

from dataclasses import dataclass

from ._text import as_text, proc_path, read_bytes


@dataclass(frozen=True)
class Mount:
    point: str        # where, as the process sees it (octal escapes left as they are)
    root: str         # the part of the file system mounted there
    fstype: str
    source: str


def parse_mountinfo(data: str | bytes) -> list[Mount]:
    out = []
    for ln in as_text(data).splitlines():
        left, sep, right = ln.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        out.append(Mount(point=f[4], root=f[3], fstype=r[0], source=r[1]))
    return out


def read_mountinfo(pid: int | str) -> list[Mount]:
    return parse_mountinfo(read_bytes(proc_path(pid, "mountinfo")))
