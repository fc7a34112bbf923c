"""End to end: unlinked files, FIFOs and memfds (resources/fdkinds/unlinked.py,
fifo.py, memfd.py) and mappings of memfds and unlinked files (memory.py).

Each program (tests/progs/fd_*.c) sets its state up, prints READY and on
SIGUSR1 checks every detail (content, offsets, flags, seals, sharing) and
prints PASS or FAIL; the selfcheck runs them without lcr.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from helpers import (Procs, Running, assert_clean_error, assert_pass, assert_running_untraced,
                     exists, lcr, live_children, reap, restart_image,
                     wait_for_line)

MiB = 1 << 20


def _start(procs: Procs, argv: list, log: Path) -> Running:
    p = procs.start(argv, log)
    m = wait_for_line(log, r"^READY pid=(\d+)", pid=p.pid)
    assert int(m.group(1)) == p.pid
    return Running(p.pid, log, None, p, m.string)


def start_unlinked(bins, procs, tmp: Path, *extra) -> tuple[Running, Path]:
    d = tmp / "u-dir"
    d.mkdir(exist_ok=True)
    return _start(procs, [bins["fd_unlinked"], d, *extra], tmp / "fd_unlinked.log"), d


def start_fifo(bins, procs, tmp: Path) -> tuple[Running, Path]:
    d = tmp / "fifo-dir"
    d.mkdir(exist_ok=True)
    return _start(procs, [bins["fd_fifo"], d], tmp / "fd_fifo.log"), d


def start_memfd(bins, procs, tmp: Path) -> tuple[Running, int]:
    r = _start(procs, [bins["fd_memfd"]], tmp / "fd_memfd.log")
    child = int(re.search(r"child=(\d+)", r.ready).group(1))
    procs.add(child)
    return r, child


STARTERS = {"fd_unlinked": start_unlinked, "fd_fifo": start_fifo, "fd_memfd": start_memfd}


# --------------------------------------------------------------------------
# the programs alone

@pytest.mark.parametrize("name", list(STARTERS))
def test_selfcheck(name, bins, procs, tmp_path):
    r, _ = STARTERS[name](bins, procs, tmp_path)
    assert_pass(r.pid, r.log, name)
    assert_pass(r.pid, r.log, name)
    assert_running_untraced(r.pid)


# --------------------------------------------------------------------------
# checkpoint (kill) + restart, twice: a restored process is saved again

@pytest.mark.e2e
@pytest.mark.parametrize("name", list(STARTERS))
def test_checkpoint_restart(name, bins, procs, tmp_path):
    r, extra = STARTERS[name](bins, procs, tmp_path)
    assert_pass(r.pid, r.log, name)
    for cycle in range(2):
        lcr("checkpoint", r.pid, "-o", tmp_path / f"img{cycle}")
        reap(r.pid)
        if name == "fd_memfd":
            reap(extra)     # re-parented to us (a subreaper) when its parent died
        new = restart_image(tmp_path / f"img{cycle}", procs)
        assert new == r.pid
        if name == "fd_memfd":
            assert exists(extra), "the child sharing the memfd was not restored"
            procs.add(extra)
        assert_running_untraced(new)
        assert_pass(new, r.log, name)
        assert_pass(new, r.log, name)


@pytest.mark.e2e
def test_fifo_leave_running_consumes_nothing(bins, procs, tmp_path):
    """Saving the FIFOs reads nothing the program would read (tee), even of
    a FIFO whose only fd in the tree is a write end."""
    r, _ = start_fifo(bins, procs, tmp_path)
    lcr("checkpoint", r.pid, "-o", tmp_path / "img", "--leave-running")
    assert_running_untraced(r.pid)
    assert_pass(r.pid, r.log, "fd_fifo")
    os.kill(r.pid, 9)
    reap(r.pid)
    new = restart_image(tmp_path / "img", procs)
    assert_pass(new, r.log, "fd_fifo")


@pytest.mark.e2e
def test_unlinked_content_saved_without_holes(bins, procs, tmp_path):
    """Only the runs of data of an unlinked file go into the image."""
    r, d = start_unlinked(bins, procs, tmp_path)
    lcr("checkpoint", r.pid, "-o", tmp_path / "img", "--leave-running")
    shown = json.loads(lcr("show", "--json", tmp_path / "img").stdout)
    states = [f["state"] for f in shown["tree"]["files"] if f["kind"] == "unlinked"]
    unl = [s for s in states if s["path"] == str(d / "unl.dat")]
    assert len(unl) == 2, states          # two descriptions (A and C share one)
    size = unl[0]["content"]["size"]
    saved = sum(len(e["data"]) * 3 // 4 for e in unl[0]["content"]["extents"])   # base64
    assert size > MiB and saved < 200_000, (size, saved)
    assert {m["path"] for m in shown["tree"]["mapped"]} == {str(d / "maponly.dat")}
    assert_pass(r.pid, r.log, "fd_unlinked")


@pytest.mark.e2e
def test_unlinked_path_taken_at_restart(bins, procs, tmp_path):
    """Another file now has the unlinked file's name: it is left alone, the
    file is recreated under another name in the same directory."""
    r, d = start_unlinked(bins, procs, tmp_path)
    lcr("checkpoint", r.pid, "-o", tmp_path / "img")
    reap(r.pid)
    (d / "unl.dat").write_text("someone else's file\n")
    new = restart_image(tmp_path / "img", procs)
    assert_pass(new, r.log, "fd_unlinked")
    assert (d / "unl.dat").read_text() == "someone else's file\n"
    assert sorted(p.name for p in d.iterdir()) == ["after.dat", "unl.dat"]


# --------------------------------------------------------------------------
# what is refused, cleanly

@pytest.mark.e2e
def test_unlinked_too_big_refused(bins, procs, tmp_path):
    r, d = start_unlinked(bins, procs, tmp_path, "big")
    cp = lcr("check", r.pid, check=False)
    assert cp.returncode == 5, cp
    line = [ln for ln in cp.stdout.splitlines() if "big.dat" in ln]
    assert line and "20.0 MiB" in line[0] and "unlinked file" in line[0], cp.stdout
    img = tmp_path / "img"
    cp = lcr("checkpoint", r.pid, "-o", img, check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), "big.dat", "20.0 MiB"])
    assert not img.exists()
    assert_running_untraced(r.pid)
    assert_pass(r.pid, r.log, "fd_unlinked")


@pytest.mark.e2e
def test_fifo_missing_at_restart(bins, procs, tmp_path):
    r, d = start_fifo(bins, procs, tmp_path)
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    (d / "f2").unlink()
    before = live_children()
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(d / "f2"), "fifo"], empty_stdout=True)
    assert not exists(r.pid), "a failed restart left a process"
    assert live_children() == before


@pytest.mark.e2e
def test_fifo_replaced_by_a_file_at_restart(bins, procs, tmp_path):
    r, d = start_fifo(bins, procs, tmp_path)
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    (d / "f1").unlink()
    (d / "f1").write_text("a file\n")
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(d / "f1"), "fifo"])
    assert not exists(r.pid)


@pytest.mark.e2e
def test_unlinked_directory_gone_at_restart(bins, procs, tmp_path):
    r, d = start_unlinked(bins, procs, tmp_path)
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    d.rename(tmp_path / "elsewhere")
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(d)], match="does not exist")
    assert not exists(r.pid)


# --------------------------------------------------------------------------
# pieces, without processes

def _smaps(line: str, flags: str = "rd wr mr mw me sd"):
    from linuxcr.procfs.maps import parse_smaps
    return parse_smaps(f"{line}\nSize: 8 kB\nVmFlags: {flags}\n")[0]


def test_classify_memfd_and_deleted_mappings():
    from linuxcr.resources.memory import classify
    a = classify(_smaps("7f0000000000-7f0000002000 rw-s 00000000 00:01 1234   /memfd:my buf (deleted)"))
    assert a.reason is None and a.vma.kind == "memfd" and not a.vma.pages
    assert (a.vma.dev, a.vma.shm, a.vma.path) == (os.makedev(0, 1), 1234, "/memfd:my buf")
    b = classify(_smaps("7f0000000000-7f0000002000 rw-p 00004000 fe:00 77   /tmp/x y (deleted)"))
    assert b.vma.kind == "deleted" and b.vma.pages and b.vma.offset == 0x4000
    assert (b.vma.dev, b.vma.path) == (os.makedev(0xfe, 0), "/tmp/x y")
    # lcr's own restored shared anonymous memory is shared anonymous memory again
    c = classify(_smaps("7f0000000000-7f0000002000 rw-s 00000000 00:01 99   /memfd:lcr-shm (deleted)"))
    assert c.vma.kind == "shmem" and c.vma.shm == 99 and c.vma.pages
    d = classify(_smaps("7f0000000000-7f0000002000 rw-s 00000000 00:0d 5   /secretmem (deleted)"))
    assert d.vma is None and "memfd_secret" in d.reason
    e = classify(_smaps("7f0000000000-7f0000200000 rw-s 00000000 00:10 5   /memfd:huge (deleted)",
                        "rd wr mr mw me sd ht"))
    assert e.vma is None and "hugetlb" in e.reason


def test_content_runs_skip_holes(tmp_path):
    from linuxcr.resources.fdkinds.unlinked import data_runs, read_content
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.write(b"a" * 5000)
        f.seek(8 << 20)
        f.write(b"b" * 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        runs = data_runs(fd, st.st_size)
        assert len(runs) == 2 and runs[0][0] == 0 and runs[1][0] <= 8 << 20 < sum(runs[1])
        c = read_content(fd, st)
    finally:
        os.close(fd)
    assert c.size == (8 << 20) + 100 and sum(len(e.data) for e in c.extents) < 20000
    data = bytearray(c.size)
    for e in c.extents:
        data[e.offset:e.offset + len(e.data)] = e.data
    assert bytes(data) == p.read_bytes()


def test_states_round_trip_and_are_bounded():
    import msgspec
    from linuxcr.image.kinds import Extent, FileContent, FifoState, MemfdState, UnlinkedState
    from linuxcr.image.schema import FileDesc, Tree
    c = FileContent(dev=1, ino=2, size=10, mode=0o600, extents=[Extent(offset=0, data=b"0123456789")])
    files = [FileDesc(fid=0, kind="memfd", flags=2, state=MemfdState(name="m", content=c, seals=9)),
             FileDesc(fid=1, kind="unlinked", flags=0, state=UnlinkedState(path="/a", content=c)),
             FileDesc(fid=2, kind="fifo", flags=0, state=FifoState(path="/f", size=4096, data=b"x"))]
    t = Tree(root=5, files=files, mapped=[UnlinkedState(path="/b", content=c)])
    raw = msgspec.msgpack.encode(t)
    assert msgspec.msgpack.decode(raw, type=Tree) == t
    bad = msgspec.msgpack.encode(MemfdState(name="x" * 300, content=c))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(bad, type=MemfdState)
