"""/proc/sysvipc/{shm,sem,msg}: the System V IPC objects of the reader's
ipc namespace (pids as the reader's pid namespace sees them)."""
from __future__ import annotations

from ._text import as_text, read_bytes


def parse_sysvipc(data: str | bytes) -> list[dict[str, int]]:
    """One dict per object, keyed by the header's column names; ``perms``
    is octal there, every other column decimal."""
    lines = as_text(data).splitlines()
    if not lines:
        return []
    cols = lines[0].split()
    out = []
    for ln in lines[1:]:
        vals = ln.split()
        if len(vals) != len(cols):
            continue
        out.append({c: int(v, 8 if c == "perms" else 10) for c, v in zip(cols, vals)})
    return out


def read_sysvipc(kind: str) -> list[dict[str, int]]:
    """kind: shm, sem or msg."""
    return parse_sysvipc(read_bytes(f"/proc/sysvipc/{kind}"))
