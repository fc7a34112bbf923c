"""Write tracking (linuxcr.resources.dirty) on real processes.

tests/progs/dirty_writer.c writes exactly the pages it is told to over a
FIFO; each test starts tracking it (freeze, Tracker.start, thaw), has it write
chosen pages, and checks that the tracker reports those pages and no other
page of its buffers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import helpers
import rootless_helpers as rh
from linuxcr.errors import KernelError
from linuxcr.procfs import read_smaps
from linuxcr.resources import dirty
from linuxcr.sys import uffd as U

PAGE = os.sysconf("SC_PAGE_SIZE")
pytestmark = pytest.mark.skipif(not dirty.available()[0], reason=dirty.available()[1])


class Writer:
    """A running dirty_writer and its command FIFO."""

    def __init__(self, pid: int, log: Path, fifo: Path, ready: str) -> None:
        self.pid, self.log = pid, log
        self.fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        f = dict(re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", ready))
        self.buf, self.npages = int(f["buf"], 16), int(f["npages"])
        self.fpriv, self.fpages = int(f["fpriv"], 16), int(f["fpages"])
        self.seq = 0

    def cmd(self, c: str) -> str:
        """Send one command; its answer's details."""
        self.seq += 1
        os.write(self.fd, c.encode() + b"\n")
        m = helpers.wait_for_line(self.log, rf"^DONE {self.seq} (\S) ?(.*)$", 30, pid=self.pid)
        return m.group(2)

    def addr(self, c: str) -> int:
        return int(re.search(r"addr=(0x[0-9a-f]+)", self.cmd(c)).group(1), 16)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def writer(bins, procs, tmp_path):
    fifo = tmp_path / "cmd"
    os.mkfifo(fifo)
    log = tmp_path / "log"
    p = procs.start([bins["dirty_writer"], fifo, tmp_path], log)
    m = helpers.wait_for_line(log, r"^READY pid=\d+ .*$", pid=p.pid)
    w = Writer(p.pid, log, fifo, m.group(0))
    yield w
    w.close()


def pages_in(d: dirty.Dirty, start: int, npages: int) -> set[int]:
    """Indexes of the pages of [start, start + npages pages) reported written."""
    out = set()
    for a, n in d.runs_within(start, start + npages * PAGE, include_untracked=False):
        out.update(range((a - start) // PAGE, (a - start) // PAGE + n))
    return out


def within(ranges, start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in ranges)


def uw_areas(pid: int) -> list[tuple[int, int]]:
    return [(e.map.start, e.map.end) for e in read_smaps(pid) if "uw" in e.vmflags]


# --------------------------------------------------------------------------


def test_available():
    assert dirty.available() == (True, "")
    assert dirty.available(os.getpid()) == (True, "")
    ok, why = dirty.available(2 ** 22 + 1)
    assert not ok and "no such process" in why


def test_dirty_lookups():
    d = dirty.Dirty(written=[(0x10000, 2), (0x20000, 1)], untracked=[(0x30000, 0x32000)])
    assert d.is_written(0x10000) and d.is_written(0x11fff) and not d.is_written(0x12000)
    assert d.is_written(0x31000) and not d.is_written(0x31000, include_untracked=False)
    assert not d.is_written(0xf000) and not d.is_written(0x40000)
    assert d.runs_within(0x11000, 0x31000) == [(0x11000, 1), (0x20000, 1), (0x30000, 1)]
    assert d.runs_within(0x11000, 0x31000, include_untracked=False) == [(0x11000, 1), (0x20000, 1)]
    assert d.pages == 3


def test_exact_pages_and_reset(writer):
    w = writer
    with dirty.track(w.pid) as tr:
        assert tr.uffd >= 0
        assert not [fd for fd in os.listdir(f"/proc/{w.pid}/fd") if U.is_userfaultfd(int(fd), w.pid)], \
            "the process must hold no userfaultfd"
        base = tr.collect()      # whatever the thaw itself touched
        assert pages_in(base, w.buf, w.npages) == set()
        # buf: [0,1024) written at start, [1024,1536) read only, rest untouched
        for c in ("w 3", "w 4", "w 1500", "w 1900", "r 1700", "r 5", "f 2", "T 7", "r 1600"):
            w.cmd(c)
        d = tr.collect()
        assert pages_in(d, w.buf, w.npages) == {3, 4, 7, 1500, 1900}
        assert pages_in(d, w.fpriv, w.fpages) == {2}
        assert not any(s < w.buf + w.npages * PAGE and e > w.buf for s, e in d.untracked)
        d2 = tr.collect()
        assert pages_in(d2, w.buf, w.npages) == set()
        assert pages_in(d2, w.fpriv, w.fpages) == set()
        # reset=False only looks
        w.cmd("w 8")
        assert pages_in(tr.collect(reset=False), w.buf, w.npages) == {8}
        assert pages_in(tr.collect(), w.buf, w.npages) == {8}
        assert pages_in(tr.collect(), w.buf, w.npages) == set()
        assert w.cmd("c") == "ok"


def test_kernel_writes_tracked(writer):
    """read(2) into a write-protected page and into a never-touched one: the
    kernel's copy-out is resolved like a user write (no EFAULT, no SIGBUS)."""
    w = writer
    with dirty.track(w.pid) as tr:
        tr.collect()
        assert w.cmd("R 10") == "n=4096 errno=0"
        assert w.cmd("R 1800") == "n=4096 errno=0"
        assert pages_in(tr.collect(), w.buf, w.npages) == {10, 1800}
        assert w.cmd("c") == "ok"
    helpers.assert_running_untraced(w.pid)


def test_new_moved_grown_unmapped(writer):
    w = writer
    with dirty.track(w.pid) as tr:
        tr.collect()
        area = w.addr("m 5")
        heap = w.addr("b 3")
        d = tr.collect()
        assert within(d.untracked, area, area + 5 * PAGE)
        assert within(d.untracked, heap, heap + 3 * PAGE)
        assert d.is_written(area) and d.is_written(heap + 2 * PAGE)
        d = tr.collect()        # registered now, nothing written since
        assert not pages_in(d, area, 5) and not pages_in(d, heap, 3)
        assert not within(d.untracked, area, area + PAGE)
        moved = w.addr("M")     # mremap to 10 pages, may move
        d = tr.collect()
        if moved != area:
            assert within(d.untracked, moved, moved + 10 * PAGE)
        else:                   # grown in place: the new part counts
            assert set(range(5, 10)) <= pages_in(d, moved, 10) | {
                i for i in range(10) if d.is_written(moved + i * PAGE)}
        d = tr.collect()
        assert not pages_in(d, moved, 10) and not within(d.untracked, moved, moved + PAGE)
        w.cmd("u")
        d = tr.collect()
        assert not pages_in(d, moved, 10) and not within(d.untracked, moved, moved + PAGE)
        assert w.cmd("c") == "ok"


def test_stack_growth(writer):
    w = writer
    with dirty.track(w.pid) as tr:
        tr.collect()
        out = w.cmd("s 600")    # 600 KiB below the frame: grows the stack VMA
        lo, hi = (int(x, 16) for x in re.findall(r"0x[0-9a-f]+", out))
        first, last = lo & ~(PAGE - 1), hi & ~(PAGE - 1)
        n = (last - first) // PAGE + 1
        d = tr.collect()
        missed = [i for i in range(n) if not d.is_written(first + i * PAGE)]
        assert not missed, f"{len(missed)} of {n} stack pages written not reported"
        w.cmd("s 600")
        d = tr.collect()
        assert all(d.is_written(first + i * PAGE) for i in range(n))
        assert w.cmd("c") == "ok"


def test_fork_child_unaffected(writer):
    w = writer
    with dirty.track(w.pid) as tr:
        tr.collect()
        assert w.cmd("F") == "status=0"     # the child wrote page 1, checked all, exited 0
        assert pages_in(tr.collect(), w.buf, w.npages) == {2}
        w.cmd("w 1")
        assert pages_in(tr.collect(), w.buf, w.npages) == {1}
        assert w.cmd("c") == "ok"


def test_close_unregisters(writer):
    w = writer
    tr = dirty.track(w.pid)
    assert within(uw_areas(w.pid), w.buf, w.buf + w.npages * PAGE)
    assert within(tr.tracked_areas(), w.buf, w.buf + w.npages * PAGE)
    tr.collect()
    tr.close()
    tr.close()                  # idempotent
    assert uw_areas(w.pid) == []
    with open(f"/proc/{w.pid}/pagemap", "rb") as f:     # no uffd-wp bit left
        f.seek(w.buf // PAGE * 8)
        entries = f.read(w.npages // 2 * 8)
    assert not any(int.from_bytes(entries[i:i + 8], "little") & (1 << 57)
                   for i in range(0, len(entries), 8))
    for c in ("w 3", "w 1900", "R 1901", "F", "T 5"):
        w.cmd(c)
    assert w.cmd("c") == "ok"
    helpers.assert_running_untraced(w.pid)


def test_adopt(writer):
    w = writer
    with dirty.track(w.pid) as tr:
        tr.collect()
        with dirty.Tracker.adopt(w.pid, os.dup(tr.uffd)) as tr2:
            w.cmd("w 12")
            d = tr2.collect()
            assert pages_in(d, w.buf, w.npages) == {12}
            assert not within(d.untracked, w.buf, w.buf + PAGE)
        assert pages_in(tr.collect(), w.buf, w.npages) == set()
    r, wfd = os.pipe()
    try:
        with pytest.raises(KernelError):
            dirty.Tracker.adopt(w.pid, r)
    finally:
        os.close(wfd)


def test_failed_start_leaves_nothing(writer, monkeypatch):
    w = writer

    def refuse(*a, **k):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(U, "api", refuse)
    with pytest.raises(KernelError):
        dirty.track(w.pid)
    assert uw_areas(w.pid) == []
    fds = [fd for fd in os.listdir(f"/proc/{w.pid}/fd") if U.is_userfaultfd(int(fd), w.pid)]
    assert fds == []
    helpers.assert_running_untraced(w.pid)
    assert w.cmd("c") == "ok"


# --------------------------------------------------------------------------
# as an ordinary user, on its own process (UFFD_USER_MODE_ONLY)

ROOTLESS_SCRIPT = textwrap.dedent("""
    import json, os, re, sys, time
    from linuxcr.resources import dirty
    pid, fifo, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    text = open(log).read()
    buf = int(re.search(r"buf=(0x[0-9a-f]+)", text).group(1), 16)
    fd = os.open(fifo, os.O_WRONLY)
    seq = 0
    def cmd(c):
        global seq
        seq += 1
        os.write(fd, (c + "\\n").encode())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(rf"^DONE {seq} \\S ?(.*)$", open(log).read(), re.M)
            if m:
                return m.group(1)
            time.sleep(0.01)
        raise SystemExit("no answer to " + c)
    def pages(d):
        return sorted({(a - buf) // 4096 + i for a, n in d.runs_within(buf, buf + 2048 * 4096,
                       include_untracked=False) for i in range(n)})
    out = {"available": dirty.available(pid)}
    with dirty.track(pid) as tr:
        tr.collect()
        out["answers"] = [cmd(c) for c in ("w 3", "R 10", "R 1800", "r 1700")]
        out["first"] = pages(tr.collect())
        out["second"] = pages(tr.collect())
    out["check"] = cmd("c")
    print(json.dumps(out))
""")


def test_rootless_own_process(bins, tmp_path):
    user = rh.find_user()
    why = rh.user_can_run_lcr(user)
    if why:
        pytest.skip(why)
    d = rh.user_workdir(user)
    trees = rh.Trees()
    try:
        fifo = d / "cmd"
        os.mkfifo(fifo)
        os.chown(fifo, user.uid, user.gid)
        log = d / "log"
        p = rh.start_as(user, [bins["dirty_writer"], fifo, d], log)
        trees.add(p.pid, p)
        helpers.wait_for_line(log, r"^READY pid=\d+", pid=p.pid)
        script = rh.user_file(user, d / "track.py", ROOTLESS_SCRIPT.encode())
        cp = subprocess.run([*user.prefix, sys.executable, str(script), str(p.pid), str(fifo),
                             str(log)], capture_output=True, text=True, timeout=120,
                            cwd=helpers.REPO, env=user.env())
        assert cp.returncode == 0, cp.stderr
        out = json.loads(cp.stdout)
        assert out["available"] == [True, ""]
        assert out["answers"][1:3] == ["n=4096 errno=0"] * 2
        assert out["first"] == [3, 10, 1800]
        assert out["second"] == []
        assert out["check"] == "ok"
        assert uw_areas(p.pid) == []
        helpers.assert_running_untraced(p.pid)
    finally:
        trees.kill_all()
        shutil.rmtree(d, ignore_errors=True)
