"""/proc/PID/mountinfo: the mounts a process sees (its mount namespace)."""
from __future__ import annotations

from dataclasses import dataclass

from ._text import as_text, proc_path, read_bytes


@dataclass(frozen=True)
class Mount:
    point: str        # where, as the process sees it (octal escapes decoded)
    root: str         # the part of the file system mounted there
    fstype: str
    source: str
    dev: str = ""     # "major:minor" of the file system
    options: str = ""         # per mount: rw/ro, nosuid, nodev, noexec, relatime...
    super_options: str = ""   # of the file system: size=..., mode=...


def _unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(data: str | bytes) -> list[Mount]:
    out = []
    for ln in as_text(data).splitlines():
        left, sep, right = ln.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 6 or len(r) < 2:
            continue
        out.append(Mount(point=_unescape(f[4]), root=_unescape(f[3]), fstype=r[0],
                         source=_unescape(r[1]), dev=f[2], options=f[5],
                         super_options=r[2] if len(r) > 2 else ""))
    return out


def read_mountinfo(pid: int | str) -> list[Mount]:
    return parse_mountinfo(read_bytes(proc_path(pid, "mountinfo")))
