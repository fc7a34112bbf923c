"""Checkpoint page reading by two threads (resources/memory.py read_ahead
readers=2, LCR_DUMP_READERS): the same bytes in the same order as one
reader, and a checkpoint taken either way restarts intact."""
from __future__ import annotations

import hashlib
import time

import pytest

from helpers import checkpoint_kill_restart, probe_hog, start_memhog
from linuxcr.remote.task import Tracee
from linuxcr.resources import memory


def _digests(pid: int, readers: int) -> list[tuple[int, int, str]]:
    """(tag, address, sha1 of the chunk) of every chunk read_ahead yields;
    each view is hashed again just before the next is asked for: no reader
    thread may write the buffer the caller holds."""
    vmas = [v for v in memory.read_maps(pid) if v.perms.startswith("rw") and v.perms[3] == "p"
            and not v.inode and not v.path.startswith("[v")]
    t = Tracee(pid)
    work = ((i, t, [(s, e - s)]) for i, (s, e) in
            enumerate(r for v in vmas for r in memory.runs.split([(v.start, v.end)], 64 << 10)))
    out = []
    for tag, pieces, view in memory.read_ahead(work, readers=readers):
        h = hashlib.sha1(view).hexdigest()
        time.sleep(0.001)       # the readers run ahead meanwhile
        assert hashlib.sha1(view).hexdigest() == h
        out.append((tag, pieces[0][0], h))
    return out


def test_parallel_readers_same_order_and_bytes(procs, bins, tmp_path):
    import os
    import signal
    hog = start_memhog(procs, bins, tmp_path, 8)
    os.kill(hog.pid, signal.SIGSTOP)       # its memory holds still meanwhile
    try:
        one = _digests(hog.pid, 1)
        two = _digests(hog.pid, 2)
        three = _digests(hog.pid, 3)
    finally:
        os.kill(hog.pid, signal.SIGCONT)
    assert len(one) > 64
    assert one == two == three
    assert [t for t, _a, _h in two] == list(range(len(two)))


@pytest.mark.parametrize("readers", ["1", "2"])
def test_checkpoint_with_readers_restarts_intact(procs, bins, tmp_path, monkeypatch, readers):
    monkeypatch.setenv("LCR_DUMP_READERS", readers)
    hog = start_memhog(procs, bins, tmp_path, 64)
    pid = checkpoint_kill_restart(hog.pid, tmp_path / "a.img", procs)
    assert probe_hog(pid, hog.log).ok
