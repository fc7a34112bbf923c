"""The snapshot agent SIGKILLed at every fault point of `lcr snapshot`, of a
fast rollback and of a full one (LCR_AGENT_FAULT: the client arms the point
in the agent for its request), on a CPU-busy target (memhog: checksum on
SIGUSR1), a sleeping one (pauser: pause() must only return EINTR) and a
counter whose memory and file offset move together (snap_counter).

After each kill: the target runs, untraced, with its signal mask, its
mappings either as before the command or as at the snapshot, its memory
consistent; a snapshot leaves it untouched; a rollback killed before it
changed anything leaves it as before, one killed after leaves it fully
rolled back (the rollback's guardian finished it).  Also: a killed
`lcr snapshot` client leaves no snapshot; both agent and guardian killed
leave a record `lcr check` reports, and the next agent kills the orphaned
snapshot process."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import helpers
from helpers import lcr, pass_field, probe, probe_hog, start_memhog
from test_faults import PAUSER_C, outside, pauser, wait_running  # noqa: F401
from test_snapshots import agent_env  # noqa: F401  (fixture)
from linuxcr.resources import dirty

pytestmark = pytest.mark.e2e
SETTLE = 20.0


# --- helpers -------------------------------------------------------------------

def _dir(env) -> Path:
    return Path(env["LCR_AGENT_DIR"])


def _agent_pid(env) -> int:
    return int((_dir(env) / "agent.pid").read_text())


def _ours(env) -> list[int]:
    """Live processes of this agent dir running `linuxcr agent`: the agent
    and its guardians (forks of it)."""
    want = f"LCR_AGENT_DIR={env['LCR_AGENT_DIR']}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            if b"linuxcr\0agent" not in cmd or want not in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                continue
            if helpers.proc_state(int(d)) not in (None, "Z", "X"):
                out.append(int(d))
        except OSError:
            pass
    return out


def _settled(env) -> None:
    """The agent is dead: wait until its guardians have done their work."""
    deadline = time.monotonic() + SETTLE
    while _ours(env):
        assert time.monotonic() < deadline, f"agent/guardian still there: {_ours(env)}"
        time.sleep(0.02)


def _snap_children() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == "lcr-snapshot" \
                        and helpers.proc_state(int(d)) not in (None, "Z", "X"):
                    out.append(int(d))
            except OSError:
                pass
    return out


def _killed_run(env, point: str, *args) -> None:
    """lcr ARGS with the agent armed to SIGKILL itself at ``point``."""
    agent = _agent_pid(env)
    cp = lcr(*args, check=False, env=dict(env, LCR_AGENT_FAULT=point))
    assert cp.returncode != 0, f"the fault {point} did not fire: {cp.stdout} {cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    assert "agent closed the connection" in cp.stderr, cp.stderr
    assert helpers.proc_state(agent) in (None, "Z", "X"), "the agent survived its fault"
    _settled(env)


def _snapshot(env, pid: int) -> str:
    return lcr("snapshot", pid, env=env).stdout.strip()


def _merged(maps: list[str]) -> list[tuple[int, int, str]]:
    """The layout with adjacent areas of the same permissions and file as
    one (a full rollback maps anew what the kernel had kept split)."""
    out: list[tuple[int, int, str]] = []
    for line in maps:
        rng, rest = line.split(" ", 1)
        a, b = (int(x, 16) for x in rng.split("-"))
        if out and out[-1][1] == a and out[-1][2] == rest:
            out[-1] = (out[-1][0], b, rest)
        else:
            out.append((a, b, rest))
    return out


def _maps_either(pid: int, *allowed) -> None:
    now = _merged(outside(pid).maps)
    assert any(now == _merged(a.maps) for a in allowed), \
        f"mappings neither as before nor as at the snapshot: " \
        f"{sorted(set(now) ^ set(_merged(allowed[0].maps)))}"


def _same_mask(pid: int, before) -> None:
    now = outside(pid)
    assert now.sigblk == before.sigblk, f"signal mask changed: {before.sigblk} -> {now.sigblk}"


# --- snapshot ------------------------------------------------------------------

SNAP_POINTS = ["inject.masked", "inject.parked@2", "inject.exit@2", "inject.mapped",
               "clone.entry", "clone.event", "clone.exit", "clone.rest", "track.uffd",
               "snapshot.taken"]


@pytest.mark.parametrize("point", SNAP_POINTS)
def test_snapshot_agent_killed_busy(point, bins, procs, tmp_path, agent_env):  # noqa: F811
    r = start_memhog(procs, bins, tmp_path, 16)
    h = probe_hog(r.pid, r.log)
    lcr("snapshots", env=agent_env)                     # the agent runs
    before = outside(r.pid)
    _killed_run(agent_env, point, "snapshot", r.pid)
    wait_running(r.pid)
    now = outside(r.pid)
    assert now.sigblk == before.sigblk and now.maps == before.maps and now.fds == before.fds
    assert not [c for c in _snap_children() if os.stat(f"/proc/{c}").st_uid == 0
                and helpers.proc_status(c)["TracerPid"] == "0"], "a snapshot process was left"
    for _ in range(2):
        h2 = probe_hog(r.pid, r.log)
        assert h2.ok and h2.counter > h.counter, h2.line
        h = h2


@pytest.mark.parametrize("point", ["inject.exit@2", "clone.entry", "clone.exit", "snapshot.taken"])
def test_snapshot_agent_killed_sleeping(point, pauser, procs, tmp_path, agent_env):  # noqa: F811
    log = tmp_path / "pauser.log"
    p = procs.start([pauser], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
    lcr("snapshots", env=agent_env)
    before = outside(p.pid)
    _killed_run(agent_env, point, "snapshot", p.pid)
    wait_running(p.pid)
    assert outside(p.pid) == before
    helpers.assert_pass(p.pid, log, "pauser")
    assert not [ln for ln in helpers.read_log(log).splitlines() if ln.startswith("FAIL")]


def test_killed_client_leaves_no_snapshot(bins, procs, tmp_path, agent_env):  # noqa: F811
    r = start_memhog(procs, bins, tmp_path, 16)
    lcr("snapshots", env=agent_env)
    agent = _agent_pid(agent_env)
    cp = lcr("snapshot", r.pid, check=False, env=dict(agent_env, LCR_FAULT="snapshot.reply"))
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    deadline = time.monotonic() + SETTLE
    while json.loads(lcr("snapshots", "--json", env=agent_env).stdout):
        assert time.monotonic() < deadline, "the unacknowledged snapshot is still held"
        time.sleep(0.05)
    assert _agent_pid(agent_env) == agent
    assert "its client went away" in (_dir(agent_env) / "agent.log").read_text()
    held = [c for c in _snap_children() if helpers.proc_status(c)["TracerPid"] == str(agent)]
    assert not held, f"snapshot processes still held: {held}"
    # an acknowledged one stays
    crid = _snapshot(agent_env, r.pid)
    assert [s["crid"] for s in json.loads(lcr("snapshots", "--json", env=agent_env).stdout)] == [crid]


# --- rollback ------------------------------------------------------------------

# (point, whether the rollback had begun: then it must be complete)
# (the first masked injected call reads the securebits, before the rollback begins)
COMMON = [("rollback.frozen", False), ("inject.masked", False), ("inject.masked@2", True),
          ("rollback.begun", True),
          ("inject.exit@2", True), ("inject.parked@4", True), ("inject.rest@12", True),
          ("rollback.finished", True), ("rollback.done", True)]
FAST = COMMON + [("rollback.dropped", True)]
FULL = COMMON + [("rollback.unmapped", True), ("inject.entry@20", True)]
CASES = [(p, b, "fast") for p, b in FAST] + [(p, b, "full") for p, b in FULL]


def _rollback_args(crid: str, way: str) -> tuple[str, ...]:
    return ("rollback", crid) + (("--full",) if way == "full" else ())


@pytest.mark.parametrize("point,begun,way", CASES, ids=[f"{w}-{p}" for p, _b, w in CASES])
def test_rollback_agent_killed_busy(point, begun, way, bins, procs, tmp_path, agent_env):  # noqa: F811
    if way == "fast" and not dirty.available()[0]:
        pytest.skip("no write tracking: no fast path")
    r = start_memhog(procs, bins, tmp_path, 16)
    at_snap = outside(r.pid)
    crid = _snapshot(agent_env, r.pid)
    s = probe_hog(r.pid, r.log)
    time.sleep(0.6)
    before = outside(r.pid)
    pre = probe_hog(r.pid, r.log)
    assert pre.ok and pre.counter > s.counter + 200
    _killed_run(agent_env, point, *_rollback_args(crid, way))
    wait_running(r.pid)
    _same_mask(r.pid, before)
    _maps_either(r.pid, before, at_snap)
    h = probe_hog(r.pid, r.log)
    assert h.ok, h.line
    if begun:       # fully rolled back: the counter went back near the snapshot's
        assert h.counter < pre.counter, (h.counter, pre.counter, point)
    else:           # untouched
        assert h.counter > pre.counter, (h.counter, pre.counter, point)
    assert probe_hog(r.pid, r.log).ok
    assert not [c for c in _snap_children() if helpers.proc_status(c)["TracerPid"] == "0"], \
        "an orphaned snapshot process was left"
    assert not list((_dir(agent_env) / "recovery").glob("*.json")) or not begun


COUNTER = [("rollback.frozen", False), ("rollback.begun", True), ("inject.exit@3", True),
           ("rollback.finished", True)]


@pytest.mark.parametrize("point,begun", COUNTER)
@pytest.mark.parametrize("way", ["fast", "full"])
def test_rollback_agent_killed_counter(point, begun, way, bins, procs, tmp_path, agent_env):  # noqa: F811
    data = tmp_path / "data"
    data.write_bytes(bytes(1 << 20))
    log = tmp_path / "snap_counter.log"
    p = procs.start([bins["snap_counter"], data], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
    pattern = r"^(PASS|FAIL) snap_counter"
    m = probe(p.pid, log, pattern)
    assert m.group(1) == "PASS", m.string
    snap_count = pass_field(m, "count")          # the snapshot's count is at least this
    crid = _snapshot(agent_env, p.pid)
    time.sleep(0.5)
    m = probe(p.pid, log, pattern)
    pre = pass_field(m, "count")
    assert pre > snap_count + 50
    _killed_run(agent_env, point, *_rollback_args(crid, way))
    wait_running(p.pid)
    m = probe(p.pid, log, pattern)
    assert m.group(1) == "PASS", f"memory and file offset disagree (half rolled back): {m.string}"
    now = pass_field(m, "count")
    if begun:
        assert snap_count <= now < pre, (snap_count, now, pre)
    else:
        assert now > pre, (now, pre)


@pytest.mark.parametrize("point", ["rollback.frozen", "inject.exit@2", "rollback.finished"])
def test_rollback_agent_killed_sleeping(point, pauser, procs, tmp_path, agent_env):  # noqa: F811
    log = tmp_path / "pauser.log"
    p = procs.start([pauser], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
    crid = _snapshot(agent_env, p.pid)
    helpers.assert_pass(p.pid, log, "pauser")
    before = outside(p.pid)
    _killed_run(agent_env, point, "rollback", crid, "--full")
    wait_running(p.pid)
    assert outside(p.pid).sigblk == before.sigblk
    _maps_either(p.pid, before)
    helpers.assert_pass(p.pid, log, "pauser")
    time.sleep(0.1)
    assert not [ln for ln in helpers.read_log(log).splitlines() if ln.startswith("FAIL")]


# --- both the agent and its guardian die -----------------------------------------

def test_agent_and_guardian_killed(bins, procs, tmp_path, agent_env):  # noqa: F811
    r = start_memhog(procs, bins, tmp_path, 16)
    crid = _snapshot(agent_env, r.pid)
    agent = _agent_pid(agent_env)
    env = dict(agent_env, LCR_AGENT_FAULT="rollback.begun:stop")
    import subprocess
    cl = subprocess.Popen([*helpers.LCR, "rollback", crid], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    try:
        rec = _dir(agent_env) / "recovery" / f"{r.pid}.json"
        deadline = time.monotonic() + SETTLE
        while helpers.proc_state(agent) != "T":
            assert time.monotonic() < deadline, "the agent did not stop at rollback.begun"
            time.sleep(0.02)
        data = json.loads(rec.read_text())
        assert data["state"] == "begun" and data["guardian"], data
        os.kill(data["guardian"], signal.SIGKILL)
        os.kill(agent, signal.SIGKILL)
        _settled(agent_env)
    finally:
        cl.wait()
    orphans = [c for c in _snap_children() if helpers.proc_status(c)["TracerPid"] == "0"]
    assert orphans, "the snapshot process should be left parked (untraced) for now"
    for c in orphans:      # parked: every signal blocked, sleeping
        st = helpers.proc_status(c)
        assert st["State"][0] in "ST" and int(st["SigBlk"], 16) | (1 << 8) | (1 << 18) == (1 << 64) - 1
    assert helpers.proc_state(r.pid) in ("t", "T", "S"), "the half rolled back process must not run"
    cp = lcr("check", r.pid, check=False, env=agent_env)
    assert cp.returncode == 5 and "half rolled back" in cp.stdout, cp.stdout + cp.stderr
    # a new agent kills the orphan
    lcr("snapshots", env=agent_env)
    deadline = time.monotonic() + SETTLE
    while any(helpers.proc_state(c) not in (None, "Z", "X") for c in orphans):
        assert time.monotonic() < deadline, "the orphaned snapshot process was not killed"
        time.sleep(0.05)
    assert "orphaned snapshot" in (_dir(agent_env) / "agent.log").read_text()
