"""Pure parts of resources/memory.py: span clipping, the reconcile plan, the
trampoline's place; and the one copy loop (read_ahead) on lcr's own memory."""
from __future__ import annotations

import ctypes
import os

from hypothesis import given, settings, strategies as st

from linuxcr.image import runs
from linuxcr.image.schema import Vma
from linuxcr.remote.task import Tracee
from linuxcr.resources import memory

from helpers import counting_resumes, map_starts, seized_blank

P = 4096


def _ranges():
    return st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=12).map(
        lambda xs: runs.normalize((a * P, (a + n) * P) for a, n in xs))


@given(_ranges(), _ranges())
@settings(max_examples=300, deadline=None)
def test_clip_is_intersection(a, b):
    assert runs.normalize(memory.clip(a, b)) == runs.normalize(runs.intersect(a, b))


def _vma(start: int, end: int, kind: str = "anon", shared: bool = False, path: str = "") -> Vma:
    return Vma(start=start * P, end=end * P, prot=3, shared=shared, kind=kind, path=path,
               pages=kind == "anon")


def test_plan_keeps_same_areas_and_the_vdso():
    have = [_vma(10, 20), _vma(30, 40), _vma(50, 51, "vdso")]
    want = [_vma(10, 20), _vma(30, 45), _vma(50, 51, "vdso"), _vma(60, 70)]
    key = lambda v: (v.start, v.end, v.kind) if v.kind == "anon" else None   # noqa: E731
    p = memory.plan(have, want, key, reserved=[(80 * P, 96 * P)])
    assert p.gone == [(30 * P, 40 * P)]
    assert [(v.start // P, v.end // P) for v in p.new] == [(30, 45), (60, 70)]


def test_plan_full_sweep_keeps_only_what_it_must():
    have = [_vma(10, 20, "file", shared=True, path="/x"), _vma(30, 40), _vma(50, 51, "vdso")]
    want = [_vma(10, 20, "file", shared=True, path="/x"), _vma(30, 40)]
    p = memory.plan(have, want, memory._shared_key, mapped=[(0, 1000 * P)],
                    reserved=[(100 * P, 116 * P)])
    assert p.gone == [(0, 10 * P), (20 * P, 50 * P), (51 * P, 100 * P), (116 * P, 1000 * P)]
    assert [(v.start // P, v.end // P) for v in p.new] == [(30, 40)]


def test_trampoline_place_is_free_in_the_layout():
    vmas = [_vma(0x1000, 0x1010)]
    assert not memory.free_in(vmas, 0x1008 * P)
    assert memory.free_in(vmas, 0x1010 * P)
    assert not memory.free_in(vmas, 0)          # below MIN_ADDR
    at = memory.free_gap(vmas, os.getpid())
    assert memory.free_in(vmas, at)


def test_read_ahead_copies_pieces_and_skips_what_is_gone():
    size = memory.CHUNK
    buf = (ctypes.c_char * (4 * size))()
    for i in range(4):
        ctypes.memset(ctypes.addressof(buf) + i * size, 0x41 + i, size)
    base = ctypes.addressof(buf)
    t = Tracee(os.getpid())
    try:
        work = [(i, t, [(base + i * size, size)]) for i in range(4)]
        work.insert(2, ("gone", t, [(0x1000, P)]))                      # never mapped
        work.append(("two", t, [(base, P), (base + 3 * size, P)]))   # gathered
        got = []
        for tag, pieces, view in memory.read_ahead(iter(work), skip_unreadable=True):
            got.append((tag, None if view is None else bytes(view[:1]) + bytes(view[-1:])))
        assert got == [(0, b"AA"), (1, b"BB"), ("gone", None), (2, b"CC"), (3, b"DD"),
                       ("two", b"AD")]
    finally:
        t.close()


def test_batch_runs_independent_calls_in_one_resume(procs, tmp_path):
    """Tracee.batch in a task lcr holds (as a blank): every call runs, each
    result comes back in order, a checked failure stops the batch there and
    is raised naming its place; an munmap
    over the code page makes later batches go call by call."""
    with seized_blank(procs, tmp_path) as (t, at):
        assert t.batch_at == at + memory.BATCH_AT
        a, b = at + 2 * memory.TRAMPOLINE, at + 4 * memory.TRAMPOLINE
        calls = [("mmap", (x, P, 3, 0x32, (1 << 64) - 1, 0), True) for x in (a, b)]   # FIXED|PRIVATE|ANON
        calls.append(("madvise", (a + 1, P, 4), False))              # EINVAL, not checked
        calls += [("getpid", (), True)] * 45                         # more than BATCH_MAX: two blobs
        with counting_resumes() as stops:
            got = t.batch(calls)
        assert got[:3] == [a, b, -22] and set(got[3:]) == {t.pid}
        assert len(stops) == 2
        assert {a, b} <= map_starts(t.pid)
        try:
            t.batch([("munmap", (a, P), True), ("munmap", (b + 1, P), True), ("munmap", (b, P), True)])
            raise AssertionError("EINVAL not raised")
        except OSError as e:
            assert e.errno == 22 and "munmap" in str(e) and "call 2 of 3" in str(e)
        assert a not in map_starts(t.pid) and b in map_starts(t.pid)   # ran up to the failure only
        t.syscall("munmap", b, P)
        t.syscall("munmap", at, memory.TRAMPOLINE)
        assert t.batch_at is None
