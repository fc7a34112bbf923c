"""/proc/PID/limits: a header line, then one fixed-width line per limit in
RLIMIT order (name 26 columns, soft 21, hard 21, units)."""
from __future__ import annotations

from ._text import proc_path

UNLIMITED = -1   # as the caller wants it: resource.RLIM_INFINITY


def parse_limits(text: str, unlimited: int = UNLIMITED) -> list[tuple[int, int]]:
    """(soft, hard) per limit, in RLIMIT order; ValueError on a malformed line."""
    def value(field: str) -> int:
        field = field.strip()
        return unlimited if field == "unlimited" else int(field)
    out = []
    for line in text.splitlines()[1:]:
        if line.strip():
            out.append((value(line[26:47]), value(line[47:68])))
    return out


def read_limits(pid: int | str, unlimited: int = UNLIMITED) -> list[tuple[int, int]]:
    with open(proc_path(pid, "limits")) as f:
        return parse_limits(f.read(), unlimited)
