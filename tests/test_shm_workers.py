"""Shared anonymous memory written by workers that have exited (issue 17).

A parent maps shared anonymous memory and forks workers that write into it
and exit (tests/progs/shm_workers.py): the parent's page tables map none
of those pages, pagemap shows none.  As root lcr finds them by SEEK_DATA
through /proc/PID/map_files; as an ordinary user by one mincore injected
into the task per area (resources/memory.py see_shared).  Checkpoint (kills
the parent), restart, the parent checks every page the workers wrote (and
that the rest is zero).  A 1 GiB area the workers barely touched comes back
without its untouched pages read or allocated: image and RSS stay small.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import helpers
from helpers import PROGS_DIR, assert_pass, pass_field, reap, wait_for_line
from rootless_helpers import Trees, lcr_as, root_or_user, start_as

from linuxcr.resources.memory import PAGE, resident_runs

PROG = PROGS_DIR / "shm_workers.py"
WORKERS = 4


# --- the pure helper: mincore vector -> runs ----------------------------------------

def test_resident_runs_examples():
    at = 0x7f0000000000
    assert resident_runs(at, b"") == []
    assert resident_runs(at, b"\0\0") == []
    assert resident_runs(at, b"\1\1\0\1") == [(at, 2), (at + 3 * PAGE, 1)]
    # only bit 0 counts (the others are reserved)
    assert resident_runs(at, b"\2\3\xfe\xff") == [(at + PAGE, 1), (at + 3 * PAGE, 1)]


@given(st.binary(max_size=300), st.integers(0, 1 << 20))
def test_resident_runs_property(vec, page):
    at = page * PAGE
    got = resident_runs(at, vec)
    pages = [at + i * PAGE for i, b in enumerate(vec) if b & 1]
    assert [a + k * PAGE for a, n in got for k in range(n)] == pages
    for (a, n), (b, _) in zip(got, got[1:]):     # maximal runs: a gap between any two
        assert n > 0 and a + n * PAGE < b


# --- end to end ----------------------------------------------------------------------

def _start(user, wd: Path, trees: Trees, *args) -> tuple[int, Path]:
    log = wd / "shm.log"
    argv = [sys.executable, PROG, *map(str, args)]
    if user is None:
        p = helpers.start_detached(argv, log, env=helpers.child_env(), cwd=wd)
    else:
        p = start_as(user, argv, log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^READY pid={p.pid}\b", helpers.READY_TIMEOUT, pid=p.pid)
    return p.pid, log


def _checkpoint_restart(user, pid: int, wd: Path, trees: Trees) -> int:
    img = wd / "img"
    lcr_as(user, "checkpoint", pid, "-o", img)
    reap(pid)
    cp = lcr_as(user, "restart", img)
    m = re.fullmatch(r"(\d+)\n?", cp.stdout)
    assert m, f"lcr restart should print one pid, printed {cp.stdout!r}"
    new = int(m.group(1))
    status = helpers.proc_status(new)
    init = int(status["PPid"]) if status else 0
    if user is not None and init > 1 and helpers.proc_status(init)["Name"] == "lcr-init":
        trees.add(init)
    trees.add(new)
    return new


def _rss_shmem(pid: int) -> int:
    return int(helpers.proc_status(pid)["RssShmem"].split()[0]) * 1024


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["root", "user"])
def test_workers_pages_come_back(who, request, tmp_path, trees):
    user, wd = root_or_user(request, who)     # root restores only its own images
    pid, log = _start(user, wd, trees, 64, WORKERS, "--holes")
    assert _rss_shmem(pid) == 0, "the parent should map none of the workers' pages"
    new = _checkpoint_restart(user, pid, wd, trees)
    m = assert_pass(new, log, "shm_workers")
    assert pass_field(m, "pages") == sum(-(-((64 << 20) // PAGE // WORKERS) // 3) for _ in range(WORKERS))


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["root", "user"])
def test_untouched_gib_stays_small(who, request, tmp_path, trees):
    user, wd = root_or_user(request, who)     # root restores only its own images
    pid, log = _start(user, wd, trees, 1024, WORKERS, "--sparse")
    # reading the pages faults into the parent only what was read: no holes
    lcr_as(user, "checkpoint", pid, "--leave-running", "-o", wd / "img0")
    assert _rss_shmem(pid) < 4 << 20, f"the checkpoint read holes: RssShmem {_rss_shmem(pid)}"
    new = _checkpoint_restart(user, pid, wd, trees)
    size = (wd / "img").stat().st_size
    rss = _rss_shmem(new)
    assert size < 64 << 20, f"image of a 1 GiB area with {WORKERS} pages written: {size} bytes"
    assert rss < 4 << 20, f"restored RssShmem {rss} bytes for {WORKERS} pages written"
    assert pass_field(assert_pass(new, log, "shm_workers"), "pages") == WORKERS
    assert _rss_shmem(new) < 4 << 20
    print(f"1 GiB area, {WORKERS} pages written, as {who}: image {size} bytes, restored RssShmem {rss}")


def test_swapped_shared_area_refused(monkeypatch):
    """Without map_files, an area whose object has pages in swap (smaps
    Swap) is refused by name: mincore cannot see those pages."""
    from linuxcr.errors import NotCheckpointable
    from linuxcr.image.schema import Vma
    from linuxcr.procfs.maps import MapEntry, SmapsEntry
    from linuxcr.resources import memory

    class NoTask:                      # any injection would fail the test
        pid = 4242

        def syscall(self, *a, **k):
            raise AssertionError("no call may be injected before the refusal")

    start, end = 0x7f0000000000, 0x7f0000000000 + 16 * PAGE
    v = Vma(start=start, end=end, prot=3, shared=True, kind="shmem", pages=True)
    e = SmapsEntry(MapEntry(start, end, "rw-s", 0, 0, 1, 77, "/dev/zero", True), {"Swap": 8192})
    monkeypatch.setattr(memory, "_opens", lambda pid, v: False)
    with pytest.raises(NotCheckpointable) as ei:
        memory.see_shared(NoTask(), [e], [v])
    msg = str(ei.value)
    assert f"0x{start:x}-0x{end:x}" in msg and "4242" in msg and "swap" in msg, msg
    assert "Traceback" not in msg
