"""Guard regions (madvise MADV_GUARD_INSTALL, Linux 6.13+): pages that fault
with SIGSEGV on any access, in an area that is otherwise mapped.  They hold
no content and show in no maps line: PAGEMAP_SCAN's PAGE_IS_GUARD category
finds them (Linux 6.14+).  Restore installs them again once the pages are
in, before memory locks (a locked area refuses them).

A kernel without PAGE_IS_GUARD cannot show guards; one that has no guard
regions at all has none to show: either way nothing is saved.
"""
from __future__ import annotations

import errno
import os

from linuxcr.image.schema import Task, Vma
from linuxcr.remote.task import Tracee
from linuxcr.sys.syscalls import pagemap_scan

PAGE_IS_GUARD = 1 << 8
MADV_GUARD_INSTALL = 102


def dump(pid: int, vmas: list[Vma]) -> list[list[int]]:
    """[start, end] of every guard region of the process."""
    areas = [v for v in vmas if v.kind not in ("vvar", "vvar_vclock", "vdso")]
    if not areas:
        return []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = pagemap_scan(fd, areas[0].start, areas[-1].end, anyof=PAGE_IS_GUARD,
                             return_mask=PAGE_IS_GUARD)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY):
            return []       # no PAGEMAP_SCAN, or no PAGE_IS_GUARD: see the module doc
        raise
    finally:
        os.close(fd)
    return [[s, e] for s, e in found]


def restore(t: Tracee, task: Task) -> None:
    for s, e in task.guards:
        t.syscall("madvise", s, e - s, MADV_GUARD_INSTALL)
