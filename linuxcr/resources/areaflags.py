"""Rollback: every area's madvise flags, memory locks and guard regions
become the snapshot's again, on the fast path (the layout is unchanged, the
flags may not be) and the full path (areas it kept are not re-mapped).

No cheap way shows an area's VmFlags (only smaps does, and it walks every
page: ~18 ms per GiB), so the flags are not compared: they are set, one
madvise per run of areas that want the same (holes between areas are
crossed: madvise skips them), which is a no-op in the kernel for an area
that already has them.  HUGEPAGE/NOHUGEPAGE cannot be cleared once set
(no madvise does): an area that had neither keeps what it has now.
Guard regions are found with PAGEMAP_SCAN (guards.dump) and only changed
where they differ.  Locks: munlock first (a locked area refuses a guard),
mlock last (it faults the pages in)."""
from __future__ import annotations

from linuxcr.image.schema import ProcAttrs, Vma
from linuxcr.remote.task import Tracee
from linuxcr.resources import guards, procattrs

SKIP_KINDS = ("vvar", "vvar_vclock", "vdso")
# flag -> (advice that sets it, advice that clears it)
FAMILIES = {"dd": (16, 17), "dc": (10, 11), "wf": (18, 19), "mg": (12, 13)}
MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL = 0, 1, 2
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_GUARD_REMOVE = 103
MLOCK_ONFAULT = 1


def _runs(vmas: list[Vma], want, *, contiguous: bool = False) -> list[tuple[object, int, int]]:
    """(value, start, end): maximal runs of areas for which ``want`` gives the
    same value (None: leave alone); ``contiguous``: a hole ends a run too."""
    out: list[list] = []
    for v in vmas:
        w = None if v.kind in SKIP_KINDS else want(v)     # the vDSO ends every run
        if w is None:
            out.append([None, v.start, v.end])
            continue
        if out and out[-1][0] == w and (not contiguous or out[-1][2] == v.start):
            out[-1][2] = v.end
        else:
            out.append([w, v.start, v.end])
    return [(w, s, e) for w, s, e in out if w is not None]


def _advise(t: Tracee, runs) -> int:
    n = 0
    for advice, s, e in runs:
        t.syscall("madvise", s, e - s, advice, check=False)     # ENOMEM: holes crossed
        n += 1
    return n


def guards_back(t: Tracee, vmas: list[Vma], saved: list[list[int]]) -> list[str]:
    """The snapshot's guard regions, those added since removed (MADV_GUARD_REMOVE).
    The fast path calls it before copying pages back (a page guarded since
    cannot be written), the full path after rebuilding the areas; warnings."""
    now = guards.dump(t.pid, vmas)
    if now == [list(g) for g in saved]:
        return []
    warnings = []
    for s, e in now:
        t.syscall("madvise", s, e - s, MADV_GUARD_REMOVE, check=False)
    for s, e in saved:
        try:
            t.syscall("madvise", s, e - s, guards.MADV_GUARD_INSTALL)
        except OSError as ex:
            warnings.append(f"pid {t.pid}: guard region 0x{s:x}-0x{e:x} not put back: "
                            f"{ex.strerror}")
    return warnings


def roll_back(t: Tracee, vmas: list[Vma], proc: ProcAttrs | None) -> list[str]:
    """The snapshot's flags and locks on every area of ``vmas`` (the
    snapshot's layout, which the process has now); warnings.  Guards are
    given back with the memory (guards_back), before the locks."""
    warnings: list[str] = []
    areas = vmas
    if not any(v.kind not in SKIP_KINDS for v in vmas):
        return warnings
    # 1. locks off where the snapshot had none (mlockall(MCL_FUTURE) too)
    mcl = proc.mlockall if proc is not None else 0
    if procattrs.mlockall_now(t) != mcl:
        t.syscall("munlockall")
        if mcl:
            t.syscall("mlockall", mcl, check=False)
    for _w, s, e in _runs(areas, lambda v: 0 if "lo" not in v.vmflags else None, contiguous=True):
        t.syscall("munlock", s, e - s, check=False)
    # 2. madvise flags
    for flag, (on, off) in FAMILIES.items():
        _advise(t, _runs(areas, lambda v: on if flag in v.vmflags else off))
    _advise(t, _runs(areas, lambda v: MADV_SEQUENTIAL if "sr" in v.vmflags else
                     MADV_RANDOM if "rr" in v.vmflags else MADV_NORMAL))
    _advise(t, _runs(areas, lambda v: MADV_HUGEPAGE if "hg" in v.vmflags else
                     MADV_NOHUGEPAGE if "nh" in v.vmflags else None))
    # 3. guard regions: already, by the memory path (engine/snapshots.py)
    # 4. locks on where the snapshot had them
    for onfault, s, e in _runs(areas, lambda v: (MLOCK_ONFAULT if "lf" in v.vmflags else 0)
                               if "lo" in v.vmflags else None, contiguous=True):
        try:
            t.syscall("mlock2", s, e - s, onfault)
        except OSError as ex:
            warnings.append(f"pid {t.pid}: memory 0x{s:x}-0x{e:x} not locked again: {ex.strerror} "
                            "(RLIMIT_MEMLOCK or CAP_IPC_LOCK)")
    return warnings
