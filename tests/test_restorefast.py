"""Restart speed levers (issue 19): Tracee.batch's blob against single
injections in a real stopped process, and the page writers of PageFill
(one and two threads, LCR_RESTORE_WRITERS) restoring memhog intact."""
from __future__ import annotations

import pytest

from helpers import (checkpoint_kill_restart, counting_resumes, kill_and_reap, map_starts, probe_hog,
                     restart_image, seized_blank, start_memhog)
from linuxcr.remote.task import BATCH_MAX
from linuxcr.resources import memory

P = 4096
ANON = (3, 0x32, (1 << 64) - 1, 0)        # RW, MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS, fd -1


@pytest.fixture
def blank(procs, tmp_path):
    """A stopped sleep, seized, with a trampoline (so batch_at is set)."""
    with seized_blank(procs, tmp_path) as (t, at):
        assert t.batch_at is not None
        yield t, at + 2 * memory.TRAMPOLINE


def _calls(base: int) -> list:
    return [("getpid", (), True), ("mmap", (base, P, *ANON), True),
            ("mmap", (base + 2 * P, P, *ANON), True), ("munmap", (base, P), True),
            ("madvise", (base + 1, P, 4), False), ("getpid", (), True)]


def test_batch_gives_the_results_of_single_injections(blank):
    t, base = blank
    single = [t.syscall(name, *args, check=check) for name, args, check in _calls(base)]
    other = base + 8 * P
    with counting_resumes() as conts:
        batched = t.batch(_calls(other))
    assert len(conts) == 1                       # one resume for the six calls
    shift = lambda r, i: r - (other - base) if i in (1, 2) else r   # noqa: E731
    assert [shift(r, i) for i, r in enumerate(batched)] == single
    assert single == [t.pid, base, base + 2 * P, 0, -22, t.pid]
    m = map_starts(t.pid)
    assert base + 2 * P in m and other + 2 * P in m and base not in m and other not in m


def test_batch_error_mid_batch_names_the_call_and_stops_there(blank):
    t, base = blank
    calls = [("mmap", (base, P, *ANON), True), ("getpid", (), True),
             ("munmap", (base + 1, P), True),                     # EINVAL, checked
             ("mmap", (base + 4 * P, P, *ANON), True)]
    with pytest.raises(OSError) as e:
        t.batch(calls)
    assert e.value.errno == 22
    assert "munmap" in str(e.value) and "call 3 of 4" in str(e.value)
    m = map_starts(t.pid)
    assert base in m and base + 4 * P not in m   # ran up to the failing call, not past it
    # the task is still usable, by batch and singly
    assert t.batch([("getpid", (), True), ("munmap", (base, P), True)]) == [t.pid, 0]
    assert t.syscall("getpid") == t.pid


def test_batch_of_many_checked_calls_spans_blobs(blank):
    t, base = blank
    n = 2 * BATCH_MAX + 5                        # three blobs
    with counting_resumes() as conts:
        got = t.batch([("getpid", (), True)] * n)
    assert got == [t.pid] * n and len(conts) == 3


@pytest.mark.e2e
def test_page_writers_restore_memhog_intact(bins, procs, tmp_path, monkeypatch):
    """The same image restarted with one writer and with two: the memory
    checksum memhog keeps is right both times."""
    r = start_memhog(procs, bins, tmp_path, 64)
    a = probe_hog(r.pid, r.log)
    assert a.ok, a.line
    img = tmp_path / "img"
    monkeypatch.setenv("LCR_RESTORE_WRITERS", "1")
    new = checkpoint_kill_restart(r.pid, img, procs)
    b = probe_hog(new, r.log)
    assert b.ok, f"after restore with one writer: {b.line}"
    kill_and_reap(new)
    monkeypatch.setenv("LCR_RESTORE_WRITERS", "2")
    new = restart_image(img, procs)
    c = probe_hog(new, r.log)
    assert c.ok, f"after restore with two writers: {c.line}"
    assert c.counter > a.counter


@pytest.mark.e2e
def test_page_writers_restore_a_cow_tree(bins, trees, tmp_path, monkeypatch):
    """A tree poured task by task (TaskPages) with two writers: every
    process's checksum as before."""
    from rootless_helpers import checkpoint_tree, restart_tree
    from test_cow import _start, sums
    root, workers, log = _start(bins, trees, tmp_path)
    before = sums(root, workers, log)
    checkpoint_tree(root, tmp_path / "img")
    monkeypatch.setenv("LCR_RESTORE_WRITERS", "2")
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == root
    assert sums(root, workers, log) == before


@pytest.mark.parametrize("writers", ["1", "2"])
def test_failed_fill_joins_reader_thread(procs, bins, tmp_path, monkeypatch, writers):
    """A restart that fails in the middle of the pages (here: a fault
    injected after the 3rd record) returns only once the thread reading
    ahead has stopped: it must not go on reading the image fd (or its
    buffers) while the restart tears down."""
    import threading

    from helpers import lcr, reap
    from linuxcr import api, faults
    from linuxcr.errors import FaultInjected
    hog = start_memhog(procs, bins, tmp_path, 32)
    img = tmp_path / "a.img"
    lcr("checkpoint", hog.pid, "-o", img)
    reap(hog.pid)
    before = {t.ident for t in threading.enumerate()}
    monkeypatch.setenv("LCR_RESTORE_WRITERS", writers)
    monkeypatch.setenv(faults.ENV, "restore.pages:raise@3")
    monkeypatch.setattr(faults, "_hits", {})
    with pytest.raises(FaultInjected):
        api.restart(str(img))
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []
    try:                                # and the half-made process torn down
        with open(f"/proc/{hog.pid}/cmdline", "rb") as f:
            assert b"memhog" not in f.read()
    except FileNotFoundError:
        pass
