"""Rollback that copies only what changed: the write tracker the agent keeps
per process (engine/snapshots.py WriteTrackers), the fast path, the fall
back to the full rebuild when the layout changed, several snapshots of one
process, and sharing the tracker with incremental checkpoints (--track)."""
from __future__ import annotations

import os
import signal
import time

import pytest

import helpers
from helpers import READY_TIMEOUT, lcr, log_size, pass_field, probe, probe_hog, start_memhog, wait_for_line
from linuxcr import agent
from linuxcr.resources import dirty
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not dirty.available()[0], reason=f"no write tracking: {dirty.available()[1]}")]


def _uw(pid: int) -> int:
    """Areas of pid registered with a userfaultfd (VmFlags uw)."""
    with open(f"/proc/{pid}/smaps") as f:
        return sum(1 for ln in f if ln.startswith("VmFlags:") and " uw" in ln)


def _start_mm(bins, procs, tmp_path):
    log = tmp_path / "snap_mm.log"
    p = procs.start([bins["snap_mm"]], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    return p.pid, log


def _mm(pid, log) -> dict:
    m = probe(pid, log, r"^(PASS|FAIL) snap_mm\b")
    assert m.group(1) == "PASS", m.string
    return {k: pass_field(m, k) for k in ("gen", "count", "bres", "bzero", "cpages")}


def _signal(pid, log, sig, pattern):
    start = log_size(log)
    os.kill(pid, sig)
    wait_for_line(log, pattern, READY_TIMEOUT, start=start, pid=pid)


def _step(pid, log):
    _signal(pid, log, signal.SIGUSR2, r"^STEP pid=")


def test_fast_rollback_memhog(bins, procs, tmp_path, agent_env):  # noqa: F811
    r = start_memhog(procs, bins, tmp_path, 256)
    snap = agent.snapshot(r.pid)
    assert snap.info["fast_rollback"] is True
    at_snap = probe_hog(r.pid, r.log)
    assert _uw(r.pid) > 0
    time.sleep(1.5)
    later = probe_hog(r.pid, r.log)
    assert later.ok and later.counter > at_snap.counter + 500
    res = agent.rollback(snap.crid)
    assert res["path"] == "fast", res
    # memhog rewrites 4 random words a millisecond: a few thousand pages of 65536
    assert 0 < res["pages_copied"] < 20000, res
    back = probe_hog(r.pid, r.log)
    assert back.ok, back.line
    assert back.counter <= at_snap.counter + 300, (back.counter, at_snap.counter)
    # twice: the tracker was reset by the first one
    time.sleep(0.5)
    res2 = agent.rollback(snap.crid)
    assert res2["path"] == "fast" and res2["pages_copied"] < res["pages_copied"], res2
    back = probe_hog(r.pid, r.log)
    assert back.ok and back.counter <= at_snap.counter + 300, back.line
    # the full path on request, then fast again
    full = agent.rollback(snap.crid, full=True)
    assert full["path"] == "full" and full["pages_copied"] >= 65536, full
    assert probe_hog(r.pid, r.log).ok
    time.sleep(0.3)
    assert agent.rollback(snap.crid)["path"] == "fast"
    back = probe_hog(r.pid, r.log)
    assert back.ok and back.counter <= at_snap.counter + 300, back.line
    # no tracker wanted any more: the areas are unregistered
    snap.discard()
    assert _uw(r.pid) == 0
    assert agent.trackers() == []
    helpers.assert_running_untraced(r.pid)


def test_layout_changed_takes_full_path(bins, procs, tmp_path, agent_env):  # noqa: F811
    pid, log = _start_mm(bins, procs, tmp_path)
    snap = agent.snapshot(pid)
    _signal(pid, log, signal.SIGHUP, r"^REMAP pid=")
    assert _mm(pid, log)["cpages"] == 32
    res = agent.rollback(snap.crid)
    assert res["path"] == "full", res
    assert "layout changed" in res["per_process"][0]["reason"], res
    st = _mm(pid, log)
    assert st["cpages"] == 16 and st["gen"] == 0, st
    # the process equals the snapshot again and the tracker counts from there
    _step(pid, log)
    res = agent.rollback(snap.crid)
    assert res["path"] == "fast", res
    st = _mm(pid, log)
    assert st["gen"] == 0 and st["bzero"] == 1 and st["cpages"] == 16, st
    snap.discard()
    assert _uw(pid) == 0


def test_page_absent_at_snapshot_reads_zero(bins, procs, tmp_path, agent_env):  # noqa: F811
    pid, log = _start_mm(bins, procs, tmp_path)
    assert _mm(pid, log)["bres"] == 0
    snap = agent.snapshot(pid)
    _step(pid, log)
    st = _mm(pid, log)
    assert st["gen"] == 1 and st["bres"] == 64 and st["bzero"] == 0, st
    res = agent.rollback(snap.crid)
    assert res["path"] == "fast" and res["pages_dropped"] >= 64, res
    st = _mm(pid, log)
    assert st["gen"] == 0 and st["bzero"] == 1 and st["bres"] == 0, st
    snap.discard()


def test_several_snapshots_of_one_process(bins, procs, tmp_path, agent_env):  # noqa: F811
    """Every collect is folded into every snapshot: rolling back to the
    older one, then to the newer one, then to the older again, all fast."""
    pid, log = _start_mm(bins, procs, tmp_path)
    s0 = agent.snapshot(pid)                # gen 0, B untouched
    _step(pid, log)
    s1 = agent.snapshot(pid)                # gen 1, B written
    _step(pid, log)
    _step(pid, log)                         # gen 3
    res = agent.rollback(s0.crid)
    assert res["path"] == "fast", res
    st = _mm(pid, log)
    assert (st["gen"], st["bzero"], st["bres"]) == (0, 1, 0), st
    res = agent.rollback(s1.crid)
    assert res["path"] == "fast", res
    st = _mm(pid, log)
    assert (st["gen"], st["bzero"], st["bres"]) == (1, 0, 64), st
    _step(pid, log)
    res = agent.rollback(s0.crid)
    assert res["path"] == "fast", res
    st = _mm(pid, log)
    assert (st["gen"], st["bzero"], st["bres"]) == (0, 1, 0), st
    s0.discard()
    assert _uw(pid) > 0                     # s1 still counts with it
    res = agent.rollback(s1.crid)
    assert res["path"] == "fast", res
    assert _mm(pid, log)["gen"] == 1
    s1.discard()
    assert _uw(pid) == 0


def test_snapshot_shares_the_track_tracker(bins, procs, tmp_path, agent_env):  # noqa: F811
    """A --track tracker held by the agent serves the snapshots too; an
    incremental checkpoint that borrows it stays exact, and so does the
    snapshot's next rollback; the image is right."""
    r = start_memhog(procs, bins, tmp_path, 64)
    img1, img2 = tmp_path / "day1.img", tmp_path / "day2.img"
    lcr("checkpoint", r.pid, "-o", img1, "--leave-running", "--track", env=agent_env)
    [tr] = agent.trackers()
    assert tr["pid"] == r.pid and tr["epoch"]
    snap = agent.snapshot(r.pid)
    assert snap.info["fast_rollback"] is True
    at_snap = probe_hog(r.pid, r.log)
    time.sleep(1.0)
    res = agent.rollback(snap.crid)
    assert res["path"] == "fast", res
    back = probe_hog(r.pid, r.log)
    assert back.ok and back.counter <= at_snap.counter + 300, back.line
    [tr] = agent.trackers()
    assert tr["snapshots"] == 1
    time.sleep(0.5)
    # the snapshots reset the tracker: the checkpoint takes the spans the
    # agent collected since its epoch along (so it stays exact), and hands
    # back what it collected (so the snapshot's next rollback stays fast)
    cp = lcr("checkpoint", r.pid, "-o", img2, "--parent", img1, "--leave-running", env=agent_env)
    assert "uffd-wp-async" in cp.stderr, cp.stderr
    res = agent.rollback(snap.crid)
    assert res["path"] == "fast", res
    assert probe_hog(r.pid, r.log).ok
    time.sleep(0.3)
    assert agent.rollback(snap.crid, full=True)["path"] == "full"
    assert agent.rollback(snap.crid)["path"] == "fast"
    assert probe_hog(r.pid, r.log).ok
    # discarding the snapshot keeps the tracker the checkpoints want
    snap.discard()
    [tr] = agent.trackers()
    assert tr["pid"] == r.pid and tr["snapshots"] == 0 and _uw(r.pid) > 0
    assert agent.drop_tracker(r.pid) is True
    assert _uw(r.pid) == 0
    # the incremental image taken after the snapshot's reset is whole
    helpers.kill_and_reap(r.pid)
    new = helpers.restart_image(img2, procs)
    back = probe_hog(new, r.log)
    assert back.ok, back.line
    assert back.counter > at_snap.counter + 500       # day2's moment, not the snapshot's


def test_agent_death_releases_the_tracker(bins, procs, tmp_path, agent_env):  # noqa: F811
    r = start_memhog(procs, bins, tmp_path, 32)
    agent.snapshot(r.pid)
    assert _uw(r.pid) > 0
    os.kill(agent.agent_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _uw(r.pid):
        assert time.monotonic() < deadline, "the tracker outlived the agent"
        time.sleep(0.05)
    assert probe_hog(r.pid, r.log).ok
