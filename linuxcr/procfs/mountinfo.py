"""Parser of /proc/PID/mountinfo: mount id, device and mount point of each mount."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._text import as_text, lines, proc_path, read_bytes


@dataclass(frozen=True)
class Mount:
    mnt_id: int
    dev: int            # os.makedev(major, minor)
    root: str           # the mount's root inside its file system
    point: str          # where it is mounted, as the process sees it


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def parse_mountinfo(text: str | bytes) -> list[Mount]:
    out = []
    for ln in lines(as_text(text)):
        f = ln.split()
        if len(f) < 5:
            raise ValueError(f"bad mountinfo line {ln!r}")
        major, minor = f[2].split(":")
        out.append(Mount(int(f[0]), os.makedev(int(major), int(minor)), _unescape(f[3]),
                         _unescape(f[4])))
    return out


def read_mountinfo(pid: int | str) -> list[Mount]:
    return parse_mountinfo(read_bytes(proc_path(pid, "mountinfo")))
