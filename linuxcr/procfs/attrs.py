"""Small /proc files holding one number: oom_score_adj, cap_last_cap."""
from __future__ import annotations

from ._text import proc_path, read_bytes


def parse_int(text: str | bytes) -> int:
    return int(text.strip())


def read_oom_score_adj(pid: int | str) -> int:
    return parse_int(read_bytes(proc_path(pid, "oom_score_adj")))


def read_cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    return parse_int(read_bytes("/proc/sys/kernel/cap_last_cap"))


def thread_tids(pid: int) -> list[int]:
    """Every thread of pid, the leader first."""
    import os
    tids = sorted(int(t) for t in os.listdir(proc_path(pid, "task")))
    return sorted(tids, key=lambda t: t != pid)
