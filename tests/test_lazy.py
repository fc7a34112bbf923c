"""lcr restart --lazy (resources/lazy.py, docs/lazy.md): the process runs at
once, a daemonised page server fills its private anonymous memory on fault
and in the background; faults in the server kill the tree.

LCR_LAZY_PACE slows the server's background stream (a slow disk) so that
the restored process faults, forks, remaps while pages are still missing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (LCR, alive, assert_pass, exists, lcr, probe, probe_hog, reap,
                     start_memhog, wait_for_line)

SERVER_WAIT = 120.0


def _lazy_restart(img: Path, procs, log: Path, pace: float = 0.0, check: bool = True) -> dict:
    env = dict(os.environ)
    if pace:
        env["LCR_LAZY_PACE"] = str(pace)
    cp = subprocess.run([*LCR, "restart", str(img), "--lazy", "--lazy-log", str(log), "--json",
                         "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in cp.stderr, cp.stderr
    if not check:
        return {"rc": cp.returncode, "stderr": cp.stderr}
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    procs.add(data["pid"])
    assert data["lazy"]["server"] > 0 and data["lazy"]["log"] == str(log)
    return data


def _wait_gone(pid: int, timeout: float = SERVER_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not exists(pid) or _state(pid) == "Z":
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _kill(*pids: int) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(procs, bins, tmp: Path, mib: int, threads: int = 0):
    log = tmp / "lazy_mem.log"
    p = procs.start([bins["lazy_mem"], str(mib), str(threads)], log)
    wait_for_line(log, rf"^READY pid={p.pid}\b", 60, pid=p.pid)
    return p.pid, log


def _ckpt(pid: int, img: Path) -> None:
    lcr("checkpoint", pid, "-o", img)
    reap(pid)


def _complete(data: dict) -> str:
    srv = data["lazy"]["server"]
    assert _wait_gone(srv), f"page server {srv} still running"
    text = Path(data["lazy"]["log"]).read_text()
    assert "complete: all pages in" in text, text
    return text


def test_memhog_256(bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, 256)
    before = probe_hog(r.pid, r.log)
    assert before.ok
    img = tmp_path / "img"
    _ckpt(r.pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=0.02)
    assert data["pid"] == r.pid
    assert data["lazy"]["pages"] >= 256 * 256
    after = probe_hog(r.pid, r.log)            # faults most of it in, stream or not
    assert after.ok, after.line
    assert after.counter >= before.counter
    text = _complete(data)
    assert re.search(r"complete_ms=\d", text)
    assert probe_hog(r.pid, r.log).ok


def test_fork_while_lazy(bins, procs, tmp_path):
    """The process forks while most pages are missing (EVENT_FORK): the
    child sees the whole image, writes half of its pages; the parent's
    memory stays its own."""
    pid, log = _start(procs, bins, tmp_path, 64)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=0.2)
    m = probe(pid, log, r"^FORK (PASS|FAIL)", 60, sig=signal.SIGUSR2)
    assert m.group(1) == "PASS", m.string
    assert_pass(pid, log, "lazy_mem")
    text = _complete(data)
    assert re.search(r"[1-9]\d* forks", text), text


def test_remap_unmap_dontneed(bins, procs, tmp_path):
    """munmap, MADV_DONTNEED (reads zeros, not the image) and mremap while
    pages are missing."""
    pid, log = _start(procs, bins, tmp_path, 64)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=0.2)
    probe(pid, log, r"^CHANGED", 60, sig=signal.SIGHUP)
    m = probe(pid, log)
    assert m.string.startswith("PASS") and "changed=1" in m.string, m.string
    _complete(data)


def test_threads_fault_at_once(bins, procs, tmp_path):
    pid, log = _start(procs, bins, tmp_path, 128, threads=8)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=0.2)
    m = assert_pass(pid, log, "lazy_mem")
    assert "threads=8" in m.string
    text = _complete(data)
    faults = int(re.search(r"(\d+) faults", text).group(1))
    assert faults > 0, text


def test_truncated_image_kills_tree(bins, procs, tmp_path):
    pid, log = _start(procs, bins, tmp_path, 64)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=1.0)
    os.truncate(img, os.path.getsize(img) // 4)
    os.kill(pid, signal.SIGUSR1)              # touches every page: reaches the cut
    assert _wait_gone(pid, 60), "the restored process ran on after its image was truncated"
    srv = data["lazy"]["server"]
    assert _wait_gone(srv, 30)
    text = Path(data["lazy"]["log"]).read_text()
    assert "truncated" in text and "killing the restored tree" in text, text
    assert "Traceback" not in text
    assert not re.search(r"^(PASS|FAIL)", log.read_text(), re.M)


def test_server_killed_kills_tree(bins, procs, tmp_path):
    pid, log = _start(procs, bins, tmp_path, 64)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=1.0)
    srv, dog = data["lazy"]["server"], data["lazy"]["watchdog"]
    assert alive(pid)
    _kill(srv)
    assert _wait_gone(pid, 30), "the restored process ran on after its page server died"
    assert _wait_gone(dog, 30)
    text = Path(data["lazy"]["log"]).read_text()
    assert "page server died" in text, text


def test_image_removed_while_serving(bins, procs, tmp_path):
    """The server reads through the fd lcr opened: the image file removed
    while most pages are missing changes nothing; and none of lcr's or the
    server's fds is left in the restored process (its fds are the saved
    ones: the log, /dev/null; no userfaultfd, no image, no pidfd)."""
    pid, log = _start(procs, bins, tmp_path, 64)
    want = sorted((fd, os.readlink(f"/proc/{pid}/fd/{fd}")) for fd in os.listdir(f"/proc/{pid}/fd"))
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=0.5)
    os.unlink(img)
    got = sorted((fd, os.readlink(f"/proc/{pid}/fd/{fd}")) for fd in os.listdir(f"/proc/{pid}/fd"))
    assert got == want
    assert_pass(pid, log, "lazy_mem")         # touches every page: all from the removed file
    _complete(data)
    assert_pass(pid, log, "lazy_mem")


def test_watchdog_killed_then_server(bins, procs, tmp_path):
    """The watchdog killed alone is replaced: the server's death after it
    still kills the tree (else it would run on zero pages)."""
    pid, log = _start(procs, bins, tmp_path, 64)
    img = tmp_path / "img"
    _ckpt(pid, img)
    data = _lazy_restart(img, procs, tmp_path / "lazy.log", pace=1.0)
    srv, dog = data["lazy"]["server"], data["lazy"]["watchdog"]
    _kill(dog)
    wait_for_line(data["lazy"]["log"], rf"the watchdog {dog} died: a new one, pid (\d+)", 30)
    new_dog = int(re.search(r"a new one, pid (\d+)", Path(data["lazy"]["log"]).read_text()).group(1))
    assert alive(pid) and alive(new_dog)
    _kill(srv)
    assert _wait_gone(pid, 30), "the restored process ran on after its page server died"
    assert _wait_gone(new_dog, 30)
    assert "page server died" in Path(data["lazy"]["log"]).read_text()


def test_pipe_refused(bins, procs, tmp_path):
    pid, log = _start(procs, bins, tmp_path, 4)
    img = tmp_path / "img"
    _ckpt(pid, img)
    cp2 = subprocess.run(f"cat {img} | {' '.join(LCR)} restart - --lazy --no-progress",
                         shell=True, capture_output=True, text=True, timeout=60)
    assert cp2.returncode != 0 and "--lazy needs the image in a file" in cp2.stderr, cp2.stderr
    assert "Traceback" not in cp2.stderr and len(cp2.stderr.strip().splitlines()) <= 2
    assert not exists(pid) or _state(pid) == "Z"
    # from a file on stdin it works
    with open(img, "rb") as f:
        cp = subprocess.run([*LCR, "restart", "-", "--lazy", "--lazy-log", str(tmp_path / "l.log"),
                             "--no-progress"], stdin=f,
                            capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    new = int(cp.stdout.strip())
    procs.add(new)
    assert_pass(new, log, "lazy_mem")


def test_default_restart_unchanged(bins, procs, tmp_path):
    pid, log = _start(procs, bins, tmp_path, 16)
    img = tmp_path / "img"
    _ckpt(pid, img)
    cp = lcr("restart", img, "--json", "--no-progress")
    data = json.loads(cp.stdout)
    procs.add(data["pid"])
    assert "lazy" not in data
    assert data["pages"] >= 16 * 256
    assert_pass(data["pid"], log, "lazy_mem")
    # no userfaultfd anywhere near it
    for fd in os.listdir(f"/proc/{data['pid']}/fd"):
        assert "userfaultfd" not in os.readlink(f"/proc/{data['pid']}/fd/{fd}")


# --------------------------------------------------------------------------
# the page index alone

def test_extents_cut_move_copy():
    from linuxcr.resources.lazy import Extents
    P = 4096
    x = Extents()
    x.add((10 * P, 20 * P, 0, 0))
    x.add((0, 5 * P, 1, 0))
    x.add((30 * P, 40 * P, 2, 8 * P))
    assert x.find(3 * P) == 0 and x.find(7 * P) == -1 and x.find(19 * P) == 1
    taken = x.cut(12 * P, 32 * P)                       # middle of one, start of another
    assert taken == [(12 * P, 20 * P, 0, 2 * P), (30 * P, 32 * P, 2, 8 * P)]
    assert x.items == [(0, 5 * P, 1, 0), (10 * P, 12 * P, 0, 0), (32 * P, 40 * P, 2, 10 * P)]
    y = x.copy()
    x.move(32 * P, 100 * P, 8 * P)                      # mremap of the last piece
    assert x.items[-1] == (100 * P, 108 * P, 2, 10 * P)
    assert y.items[-1] == (32 * P, 40 * P, 2, 10 * P)   # the fork's copy is its own
    assert x.cut(1 * P, 2 * P) == [(1 * P, 2 * P, 1, 1 * P)]
    assert x.items[:2] == [(0, P, 1, 0), (2 * P, 5 * P, 1, 2 * P)]
    assert x.bytes() == (1 + 3 + 2 + 8) * P
    assert x.cut(200 * P, 300 * P) == []


def test_inside_splits_records():
    from linuxcr.resources.lazy import _inside
    areas = [(100, 200), (300, 400)]
    assert _inside(areas, 50, 350) == [(50, 100, False), (100, 200, True), (200, 300, False),
                                       (300, 350, True)]
    assert _inside(areas, 120, 180) == [(120, 180, True)]
    assert _inside([], 0, 10) == [(0, 10, False)]


@pytest.mark.parametrize("point", ["lazy.indexed", "restore.finished"])
def test_lcr_killed_during_lazy_restart(point, bins, procs, tmp_path):
    """lcr dies before (lazy.indexed) or after (restore.finished) the page
    server is up: no restored task survives, and the server goes too."""
    pid, log = _start(procs, bins, tmp_path, 16)
    img = tmp_path / "img"
    _ckpt(pid, img)
    llog = tmp_path / "lazy.log"
    env = dict(os.environ, LCR_FAULT=f"{point}:kill", LCR_LAZY_PACE="0.5")
    cp = subprocess.run([*LCR, "restart", str(img), "--lazy", "--lazy-log", str(llog),
                         "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert cp.returncode != 0
    assert _wait_gone(pid, 30), "a restored task survived its restart's death"
    if point == "restore.finished":
        m = re.search(r"lcr lazy\[(\d+)\]", llog.read_text())
        assert m, llog.read_text()
        assert _wait_gone(int(m.group(1)), 60), "the page server stayed after its tree died"
    else:
        assert not llog.exists() or "serving" not in llog.read_text()


def test_extents_take():
    """The stream's batch: the first pieces up to a byte budget, out in one cut."""
    from linuxcr.resources.lazy import Extents
    P = 4096
    x = Extents([(i * 2 * P, (i * 2 + 1) * P, i, 0) for i in range(10)])
    assert x.take(3 * P) == [(0, P, 0, 0), (2 * P, 3 * P, 1, 0), (4 * P, 5 * P, 2, 0)]
    assert x.starts == [p[0] for p in x.items] and len(x) == 7
    assert x.take(1) == [(6 * P, 7 * P, 3, 0)]                 # at least one
    assert x.find(8 * P) == 0 and x.find(6 * P) == -1
    assert len(x.take(100 * P)) == 6 and len(x) == 0 and x.take(P) == []
