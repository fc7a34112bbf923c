"""Incremental checkpoints (`lcr checkpoint --parent`, `--track`, `--interval`).

End to end on memhog (its checksum covers every byte of its buffer), plus the
ways a chain can be broken (a parent missing, replaced, modified) and the
periodic mode with retention.  The range arithmetic gets unit and property
tests in test_incremental_units.py.
"""
from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from helpers import (assert_clean_error, lcr, probe_hog, reap, restart_image, wait_for_line)

pytestmark = pytest.mark.e2e

MIB = 128


def _memhog(procs, bins, tmp_path, usec: int, mib: int = MIB):
    """memhog with a low write rate: 4 random words every ``usec``."""
    log = tmp_path / "memhog.log"
    p = procs.start([bins["memhog"], "-f", "-s", str(usec), str(mib)], log)
    wait_for_line(log, rf"^pid={p.pid} ready\b", 60, pid=p.pid)
    return p.pid, log


def _stats(stderr: str) -> tuple[int, int, str]:
    m = re.search(r"incremental image: (\d+) pages stored, (\d+) left to its parents \(([^)]*)\)",
                  stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), m.group(3)


def _restart_and_check(img, procs, log, *args) -> int:
    new = restart_image(img, procs, *args)
    p = probe_hog(new, log)
    assert p.ok, p.line
    return p.counter


def test_chain_of_three(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000)
    d1, d2, d3 = (tmp_path / f"day{i}.img" for i in (1, 2, 3))
    lcr("checkpoint", pid, "-o", d1, "--leave-running")
    time.sleep(0.3)
    cp2 = lcr("checkpoint", pid, "-o", d2, "--parent", d1, "--leave-running")
    stored2, inherited2, method = _stats(cp2.stderr)
    assert method == "content-hash"
    time.sleep(0.3)
    before = probe_hog(pid, log).counter
    cp3 = lcr("checkpoint", pid, "-o", d3, "--parent", d2)
    reap(pid)
    stored3, inherited3, _ = _stats(cp3.stderr)
    size1, size2, size3 = (os.path.getsize(p) for p in (d1, d2, d3))
    assert size2 < size1 / 10 and size3 < size1 / 10, (size1, size2, size3)
    assert inherited2 > 10 * stored2 and inherited3 > 10 * stored3
    counter = _restart_and_check(d3, procs, log)
    assert counter >= before


def test_chain_moved_needs_images_dir(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    lcr("checkpoint", pid, "-o", a / "full.img", "--leave-running")
    lcr("checkpoint", pid, "-o", b / "inc.img", "--parent", a / "full.img")
    reap(pid)
    moved = tmp_path / "elsewhere"
    shutil.move(a, moved)
    cp = lcr("restart", b / "inc.img", check=False)
    assert_clean_error(cp, "ImageError", mentions=["parent", "missing", "--images-dir"])
    assert not list(_children_named("memhog"))
    _restart_and_check(b / "inc.img", procs, log, "--images-dir", moved)


def _children_named(name: str):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if comm == name and ppid == os.getpid():
                yield int(d)


def test_wrong_or_changed_parent_refused(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=16)
    full, other, inc = tmp_path / "full.img", tmp_path / "other.img", tmp_path / "inc.img"
    lcr("checkpoint", pid, "-o", full, "--leave-running")
    lcr("checkpoint", pid, "-o", other, "--leave-running")
    lcr("checkpoint", pid, "-o", inc, "--parent", full, "--leave-running")
    keep = tmp_path / "full.keep"
    shutil.copy(full, keep)
    # another checkpoint of the same process in the parent's place
    shutil.copy(other, full)
    cp = lcr("restart", inc, "--any-pid", check=False)
    assert_clean_error(cp, "ImageError", mentions=["not the parent"])
    # the parent's bytes changed (one page of memory flipped, checksums redone
    # would be needed to hide it: the digest check catches any rewrite)
    shutil.copy(keep, full)
    data = bytearray(full.read_bytes())
    data[len(data) // 2] ^= 0xFF
    full.write_bytes(data)
    cp = lcr("restart", inc, "--any-pid", check=False)
    assert_clean_error(cp, "ImageError", mentions=["corrupt"])
    assert not list(_children_named("memhog")) or list(_children_named("memhog")) == [pid]
    # intact again: restarts
    shutil.copy(keep, full)
    _restart_and_check(inc, procs, log, "--any-pid")


def test_parent_of_another_process_is_only_a_content_base(bins, procs, tmp_path):
    """--parent with an image of another process: pages are compared by
    content, so the image is still right (just not small)."""
    a, _ = _memhog(procs, bins, tmp_path, usec=20000, mib=16)
    sub = tmp_path / "b"
    sub.mkdir()
    b, log_b = _memhog(procs, bins, sub, usec=20000, mib=16)
    lcr("checkpoint", a, "-o", tmp_path / "a.img", "--leave-running")
    cp = lcr("checkpoint", b, "-o", tmp_path / "b.img", "--parent", tmp_path / "a.img")
    reap(b)
    stored, inherited, _ = _stats(cp.stderr)
    assert stored >= 16 * 256       # memhog's buffer differs between the two
    _restart_and_check(tmp_path / "b.img", procs, log_b)


def test_parent_errors_are_clean(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=8)
    cp = lcr("checkpoint", pid, "-o", tmp_path / "x.img", "--parent", tmp_path / "nope.img",
             check=False)
    assert_clean_error(cp, "ImageError", mentions=["nope.img", "not found"])
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an image at all" * 100)
    cp = lcr("checkpoint", pid, "-o", tmp_path / "x.img", "--parent", junk, check=False)
    assert_clean_error(cp, "ImageError", mentions=["junk.img"])
    assert not (tmp_path / "x.img").exists()
    assert probe_hog(pid, log).ok        # untouched, still running


def test_interval_with_retention(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    out = tmp_path / "ckpts"
    cp = lcr("checkpoint", pid, "--interval", "300ms", "--count", "5", "--keep", "2",
             "--full-every", "3", "-o", out, timeout=300)
    lines = [x for x in cp.stderr.splitlines() if ".img:" in x]
    assert len(lines) == 5, cp.stderr
    kinds = [("full" if ": full," in x else "inc") for x in lines]
    assert kinds == ["full", "inc", "inc", "full", "inc"], kinds
    imgs = sorted(p.name for p in out.glob("lcr-*.img"))
    # the 2 newest (3: full, 4: incremental on it) are all that is needed
    assert len(imgs) == 2, imgs
    assert (out / "latest.img").is_symlink()
    assert probe_hog(pid, log).ok                  # ran on all the time
    os.kill(pid, 9)
    reap(pid)
    _restart_and_check(out / "latest.img", procs, log)


def test_interval_stops_when_process_exits(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=8)
    out = tmp_path / "ck"
    import subprocess
    from helpers import LCR
    p = subprocess.Popen([*LCR, "checkpoint", str(pid), "--interval", "200ms", "-o", str(out)],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("lcr-*.img"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(pid, 9)
        reap(pid)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "gone" in err and "Traceback" not in err, err


def test_tracked_chain(bins, procs, tmp_path, agent_env):
    """--track: the agent holds the write tracker between commands, and the
    next --parent checkpoint takes the written pages from it (page exact)."""
    import json
    pid, log = _memhog(procs, bins, tmp_path, usec=20000)
    js = json.loads(lcr("check", pid, "--json", env=agent_env).stdout)
    assert js["dirty_tracking"]["method"] == "content-hash" and not js["dirty_tracking"]["tracked"]
    d1, d2, d3 = (tmp_path / f"t{i}.img" for i in (1, 2, 3))
    lcr("checkpoint", pid, "-o", d1, "--leave-running", "--track", env=agent_env)
    out = lcr("check", pid, env=agent_env).stdout
    assert "uffd-wp-async" in out and "agent holds" in out, out
    assert "uw" in _vmflags(pid)            # registered while tracked
    time.sleep(0.3)
    cp2 = lcr("checkpoint", pid, "-o", d2, "--parent", d1, "--leave-running", env=agent_env)
    stored2, inherited2, method = _stats(cp2.stderr)
    assert method == "uffd-wp-async", cp2.stderr
    assert 0 < stored2 < inherited2 / 10
    time.sleep(0.3)
    before = probe_hog(pid, log).counter
    cp3 = lcr("checkpoint", pid, "-o", d3, "--parent", d2, env=agent_env)
    reap(pid)
    assert _stats(cp3.stderr)[2] == "uffd-wp-async"
    assert os.path.getsize(d3) < os.path.getsize(d1) / 10
    assert _restart_and_check(d3, procs, log) >= before


def test_tracker_of_another_image_is_not_trusted(bins, procs, tmp_path, agent_env):
    """The agent's tracker counts from the last image taken with it; a
    --parent naming an older image falls back to comparing contents."""
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    a, b, c = (tmp_path / f"{x}.img" for x in "abc")
    lcr("checkpoint", pid, "-o", a, "--leave-running", "--track", env=agent_env)
    lcr("checkpoint", pid, "-o", b, "--leave-running", "--track", env=agent_env)  # tracker now counts from b
    cp = lcr("checkpoint", pid, "-o", c, "--parent", a, "--leave-running", env=agent_env)
    assert _stats(cp.stderr)[2] == "content-hash", cp.stderr
    os.kill(pid, 9)
    reap(pid)
    _restart_and_check(c, procs, log)


def _vmflags(pid: int) -> set[str]:
    flags: set[str] = set()
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:"):
                flags.update(line.split()[1:])
    return flags


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_failed_incremental_checkpoint(bins, procs, tmp_path, agent_env, action):
    """An incremental checkpoint that fails (or whose lcr is killed) halfway
    through its pages: no image, the process runs on untouched and untraced,
    the write tracker is gone (its count was reset: trusting it later would
    lose pages), and the next --parent checkpoint compares contents."""
    import helpers
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    d1, bad, d2 = tmp_path / "d1.img", tmp_path / "bad.img", tmp_path / "d2.img"
    lcr("checkpoint", pid, "-o", d1, "--leave-running", "--track", env=agent_env)
    time.sleep(0.3)
    fault = "dump.pages@2" + (":raise" if action == "raise" else "")
    cp = lcr("checkpoint", pid, "-o", bad, "--parent", d1, "--leave-running", check=False,
             env={**agent_env, "LCR_FAULT": fault})
    assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp.stderr
    assert not bad.exists() and not list(tmp_path.glob("bad.img*"))
    deadline = time.monotonic() + 10
    while "uw" in _vmflags(pid) and time.monotonic() < deadline:
        time.sleep(0.05)            # killed: the kernel closes lcr's copy of the tracker
    assert "uw" not in _vmflags(pid)
    helpers.assert_running_untraced(pid)
    assert probe_hog(pid, log).ok
    cp = lcr("checkpoint", pid, "-o", d2, "--parent", d1, env=agent_env)
    assert _stats(cp.stderr)[2] == "content-hash", cp.stderr
    reap(pid)
    _restart_and_check(d2, procs, log)


def test_failed_chain_restart_leaves_nothing(bins, procs, tmp_path):
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    d1, d2 = tmp_path / "d1.img", tmp_path / "d2.img"
    lcr("checkpoint", pid, "-o", d1, "--leave-running")
    lcr("checkpoint", pid, "-o", d2, "--parent", d1)
    reap(pid)
    import helpers
    for fault in ("restore.pages@3:raise", "restore.pages@3"):
        cp = lcr("restart", d2, check=False, env=helpers.child_env({"LCR_FAULT": fault}))
        assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp.stderr
        helpers.reap(pid)       # killed with lcr (EXITKILL): a zombie of ours, the subreaper
        assert not helpers.exists(pid), f"restart with {fault} left pid {pid} behind"
    _restart_and_check(d2, procs, log)


def test_interval_borrows_the_agents_tracker(bins, procs, tmp_path, agent_env):
    """--interval on a process whose tracker the agent holds: it uses that
    one (a second could not register), and gives it back counting from its
    last image, so a --parent checkpoint of that image is still exact."""
    pid, log = _memhog(procs, bins, tmp_path, usec=20000, mib=32)
    lcr("checkpoint", pid, "-o", tmp_path / "first.img", "--leave-running", "--track",
        env=agent_env)
    out = tmp_path / "ck"
    cp = lcr("checkpoint", pid, "--interval", "200ms", "--count", "3", "-o", out, env=agent_env,
             timeout=300)
    assert "Traceback" not in cp.stderr and "cannot track" not in cp.stderr, cp.stderr
    latest = out / "latest.img"
    cp = lcr("checkpoint", pid, "-o", tmp_path / "after.img", "--parent", latest, env=agent_env)
    assert _stats(cp.stderr)[2] == "uffd-wp-async", cp.stderr
    reap(pid)
    _restart_and_check(tmp_path / "after.img", procs, log)
