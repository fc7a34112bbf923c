"""Fault injection: lcr killed (SIGKILL) or failing at every stage of a
checkpoint and of a restart (LCR_FAULT, see linuxcr/faults.py), disk full,
and two lcr commands on the same process or image at once.

After a checkpoint that did not complete, the target must run on as if
nothing had happened: not stopped, not traced, the same signal mask, the
same mappings (no scratch page of ours), the same fds, its memory intact
(memhog's checksum on SIGUSR1) and its counter advancing; and there is no
image file, not even a partial one.  After a restart that did not complete
there is no process left of what it was making (tasks, blank forks, the
namespace init), and the image restores fine afterwards.

Killed while it runs its queries inside the target, lcr's guardian puts
the target back (docs/guarantees.md; every boundary in test_killsafe.py).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers
from helpers import (LCR, assert_clean_error, assert_running_untraced, child_env, exists,
                     kill_and_reap, lcr, live_children, parse_restored_pid, pids_with_exe,
                     probe_hog, reap, start_memhog)

pytestmark = pytest.mark.e2e

HOG_MIB = 40          # tens of PAGES records (1 MiB each): @2 is early in the copy
SETTLE = 5.0          # seconds for a target to be running again after lcr died

# Every checkpoint stage.  The value: why it is expected to fail today (None: it must pass).
_REGS = ("registers and signal mask left as injected until the final thaw: "
         "lcr killed after the first injection lets the target go with them")
_SCRATCH = ("lcr killed during its injected queries leaves its one-page scratch mapping in "
            "the target")
DUMP_POINTS = {
    "dump.seized": None,
    "dump.frozen": None,
    "dump.inject": None,
    "dump.collected": None,
    "dump.pages@2": None,
    "dump.trailer": None,
    "dump.rename": None,
    "dump.kill": None,
}
RESTORE_POINTS = ["restore.spawned", "restore.tree", "restore.pages@2", "restore.finished"]
# SIGKILL there: every task still attached, so all die with lcr (EXITKILL)
KILL_ONLY_POINTS = ["restore.release"]


def lcr_env(fault: str | None) -> dict:
    return child_env({"LCR_FAULT": fault} if fault else {"LCR_FAULT": ""})


def lcr_fault(fault: str, *args, **kw) -> subprocess.CompletedProcess:
    return lcr(*args, check=False, env=lcr_env(fault), **kw)


# --------------------------------------------------------------------------
# what a target looks like from outside

@dataclass
class Outside:
    maps: list[str]          # start-end perms path
    fds: dict[int, str]
    sigblk: dict[int, str]   # per thread


def outside(pid: int) -> Outside:
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split(None, 5)
        maps.append(" ".join([f[0], f[1], f[5] if len(f) > 5 else ""]).strip())
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    sigblk = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        st = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        sigblk[int(tid)] = re.search(r"^SigBlk:\s*(\S+)", st, re.M).group(1)
    return Outside(maps, fds, sigblk)


def wait_running(pid: int) -> None:
    """lcr is gone: the kernel lets its tracee go; wait until it runs."""
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            assert_running_untraced(pid)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def assert_intact(r, before: Outside, counter: int) -> int:
    """The target runs on exactly as before; returns its counter now."""
    wait_running(r.pid)
    now = outside(r.pid)
    assert now.sigblk == before.sigblk, f"signal mask changed: {before.sigblk} -> {now.sigblk}"
    extra = sorted(set(now.maps) - set(before.maps))
    gone = sorted(set(before.maps) - set(now.maps))
    assert not extra and not gone, f"mappings changed: extra {extra}, gone {gone}"
    assert now.fds == before.fds, f"fds changed: {before.fds} -> {now.fds}"
    h = probe_hog(r.pid, r.log)
    assert h.ok, h.line
    assert h.counter > counter, f"counter did not advance: {counter} -> {h.counter}"
    h2 = probe_hog(r.pid, r.log)
    assert h2.ok and h2.counter > h.counter, h2.line
    assert_running_untraced(r.pid)
    return h2.counter


def no_image(d: Path, name: str = "img") -> None:
    left = [p.name for p in d.iterdir() if p.name == name or ".lcr-partial-" in p.name]
    assert not left, f"image files left behind: {left}"


@pytest.fixture
def hog(bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, HOG_MIB)
    h = probe_hog(r.pid, r.log)
    assert h.ok, h.line
    return r, h.counter


# --------------------------------------------------------------------------
# checkpoint killed at every stage

def _dump_params(action: str, scratch_matters: bool = True):
    """scratch_matters: the test compares the target's mappings before/after."""
    for point, defect in DUMP_POINTS.items():
        xf = defect and action == "kill" and (scratch_matters or defect is not _SCRATCH)
        marks = [pytest.mark.xfail(strict=True, reason=defect)] if xf else []
        yield pytest.param(point, id=point, marks=marks)


@pytest.mark.parametrize("point", _dump_params("kill"))
def test_checkpoint_killed(point, hog, tmp_path):
    r, counter = hog
    before = outside(r.pid)
    img = tmp_path / "img"
    cp = lcr_fault(point, "checkpoint", r.pid, "-o", img)
    assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    if point == "dump.kill":         # complete and named before the kill: a good image
        lcr("show", img)
        img.unlink()
    no_image(tmp_path)
    assert_intact(r, before, counter)


PAUSER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

/* Waits in pause(), which only ever returns -1/EINTR after a handler ran:
   any other return means its registers were changed under it.  A SIGUSR1
   that lands between the usr1 test and the next pause() is only seen at the
   next wake-up, so a SIGALRM every 0.5 s (its handler does nothing, pause()
   returns EINTR as for any handled signal) bounds that lost wake-up. */
static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }
static void on_alrm(int s) { (void)s; }

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_alrm;
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { { 0, 500000 }, { 0, 500000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	printf("READY pid=%d\n", getpid());
	fflush(stdout);
	for (unsigned long n = 0;;) {
		long r = syscall(SYS_pause);
		int e = errno;
		if (r != -1 || e != EINTR)
			printf("FAIL pauser pid=%d: pause() returned %ld errno %d\n", getpid(), r, e);
		if (usr1) {
			usr1 = 0;
			printf("PASS pauser pid=%d n=%lu\n", getpid(), ++n);
		}
		fflush(stdout);
	}
}
"""


@pytest.fixture(scope="module")
def pauser(tmp_path_factory):
    if not helpers.have_gcc():
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("pauser")
    (d / "pauser.c").write_text(PAUSER_C)
    subprocess.run(["gcc", "-O1", "-Wall", "-o", d / "pauser", d / "pauser.c"], check=True)
    return str(d / "pauser")


@pytest.mark.parametrize("point", _dump_params("kill", scratch_matters=False))
def test_checkpoint_killed_syscall_result(point, pauser, procs, tmp_path):
    """memhog shrugs off a wrong result of its sleep; pause() does not: if lcr
    dies with its registers in the target, the interrupted pause() returns
    the result of lcr's last injected syscall instead of restarting."""
    log = tmp_path / "pauser.log"
    p = procs.start([pauser], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
    helpers.assert_pass(p.pid, log, "pauser")
    before = outside(p.pid)
    cp = lcr_fault(point, "checkpoint", p.pid, "-o", tmp_path / "img")
    assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    wait_running(p.pid)
    time.sleep(0.2)
    fails = [ln for ln in helpers.read_log(log).splitlines() if ln.startswith("FAIL")]
    assert not fails, fails
    assert outside(p.pid).sigblk == before.sigblk
    helpers.assert_pass(p.pid, log, "pauser")


@pytest.mark.parametrize("point", [p for p in DUMP_POINTS if p != "dump.kill"])
def test_checkpoint_fails(point, hog, tmp_path):
    """The same stages with an error instead of a kill: every cleanup path
    (thaw: registers, mask, scratch page; the unnamed file) runs."""
    r, counter = hog
    before = outside(r.pid)
    img = tmp_path / "img"
    cp = lcr_fault(point.replace("@", ":raise@") if "@" in point else point + ":raise",
                   "checkpoint", r.pid, "-o", img)
    assert_clean_error(cp, "LcrError", mentions=["fault injected", point.split("@")[0]])
    no_image(tmp_path)
    assert_intact(r, before, counter)


def test_fault_hook_refuses_unknown_points(hog, tmp_path):
    r, counter = hog
    cp = lcr_fault("dump.nosuchpoint", "checkpoint", r.pid, "-o", tmp_path / "img")
    assert_clean_error(cp, mentions=["dump.nosuchpoint"])
    assert_intact(r, outside(r.pid), counter)


# --------------------------------------------------------------------------
# disk full

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("extra", [[], ["--compress"], ["--sign", "KEY"]], ids=["plain", "compress", "signed"])
def test_checkpoint_disk_full(extra, hog, tmp_path, small_tmpfs):
    r, counter = hog
    if "KEY" in extra:
        key = tmp_path / "key"
        key.write_bytes(os.urandom(32))
        extra = ["--sign", key]
    before = outside(r.pid)
    cp = lcr("checkpoint", r.pid, "-o", small_tmpfs / "img", *extra, check=False)
    assert_clean_error(cp, "ImageWriteError", match=r"no space")
    assert os.listdir(small_tmpfs) == [], "a partial image was left behind"
    assert_intact(r, before, counter)


# --------------------------------------------------------------------------
# two checkpoints of one process at once

def _wait_stopped(p: subprocess.Popen) -> None:
    deadline = time.monotonic() + helpers.LCR_TIMEOUT
    while helpers.proc_state(p.pid) != "T":
        assert p.poll() is None, f"lcr exited {p.returncode} before its fault point"
        assert time.monotonic() < deadline, "lcr never reached its fault point"
        time.sleep(0.01)


def _popen_lcr(*args, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([*LCR, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=lcr_env(fault))


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    return p.returncode, out.decode(), err.decode()


def test_second_checkpoint_while_one_holds_the_process(hog, tmp_path):
    """The first lcr stops itself with the target frozen (LCR_FAULT ...:stop):
    a second one fails with Busy, and the first then completes."""
    r, counter = hog
    before = outside(r.pid)
    first = _popen_lcr("checkpoint", r.pid, "-o", tmp_path / "a.img", "--leave-running",
                       fault="dump.collected:stop")
    try:
        _wait_stopped(first)
        assert helpers.proc_status(r.pid)["TracerPid"] == str(first.pid)
        cp = lcr("checkpoint", r.pid, "-o", tmp_path / "b.img", "--leave-running", check=False)
        assert_clean_error(cp, "Busy", mentions=[str(r.pid), str(first.pid)])
        assert not (tmp_path / "b.img").exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, _, err = _finish(first)
    assert rc == 0, err
    lcr("show", tmp_path / "a.img")
    assert_intact(r, before, counter)


def test_two_checkpoints_race(hog, tmp_path):
    r, counter = hog
    before = outside(r.pid)
    ps = [_popen_lcr("checkpoint", r.pid, "-o", tmp_path / f"{i}.img", "--leave-running")
          for i in range(2)]
    results = [_finish(p) for p in ps]
    ok = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert ok, f"neither checkpoint succeeded: {results}"
    for i, (rc, out, err) in enumerate(results):
        if rc != 0:
            cp = subprocess.CompletedProcess([], rc, out, err)
            assert_clean_error(cp, "Busy", mentions=[str(r.pid)])
            assert not (tmp_path / f"{i}.img").exists()
        else:
            lcr("show", tmp_path / f"{i}.img")
    assert_intact(r, before, counter)


# --------------------------------------------------------------------------
# restart killed at every stage

@pytest.fixture(scope="module")
def hog_image(bins, tmp_path_factory):
    """An image of memhog (the original killed by the checkpoint, reaped)."""
    tmp = tmp_path_factory.mktemp("fault-image")
    reg = helpers.Procs()
    try:
        r = start_memhog(reg, bins, tmp, HOG_MIB)
        assert probe_hog(r.pid, r.log).ok
        img = tmp / "hog.img"
        lcr("checkpoint", r.pid, "-o", img)
        reap(r.pid)
        yield img, r, bins["memhog"]
    finally:
        reg.kill_all()


def _reap_orphans(pid: int) -> None:
    """Tasks lcr made die with it; as their subreaper we reap them."""
    deadline = time.monotonic() + SETTLE
    while True:
        helpers.reap_zombie_children()
        if not exists(pid):
            return
        assert time.monotonic() < deadline, (f"pid {pid} still exists "
                                             f"(state {helpers.proc_state(pid)})")
        time.sleep(0.02)


def _assert_nothing_left(before_kids: set[int], exe: str, pid: int) -> None:
    _reap_orphans(pid)
    assert not pids_with_exe(exe), f"a {exe} process is left: {pids_with_exe(exe)}"
    left = live_children() - before_kids
    assert not left, f"processes left behind: {[(p, helpers.proc_status(p)) for p in left]}"


@pytest.mark.parametrize("action", ["kill", "raise"])
@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_restart_interrupted(point, action, hog_image):
    img, orig, exe = hog_image
    before = live_children()
    name, _, nth = point.partition("@")
    cp = lcr_fault(f"{name}:{action}" + (f"@{nth}" if nth else ""), "restart", img)
    if action == "kill":
        assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    else:
        assert_clean_error(cp, "LcrError", mentions=["fault injected", name], empty_stdout=True)
    _assert_nothing_left(before, exe, orig.pid)


@pytest.mark.parametrize("point", KILL_ONLY_POINTS)
def test_restart_killed_before_release(point, hog_image):
    img, orig, exe = hog_image
    before = live_children()
    cp = lcr_fault(f"{point}:kill", "restart", img)
    assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    _assert_nothing_left(before, exe, orig.pid)


def _restart_signalled_at(img, fault: str, sig: int) -> tuple[int, str, str]:
    """`lcr restart IMG` stopped at ``fault`` (point:stop), sent ``sig``,
    continued: its exit code, stdout, stderr."""
    p = _popen_lcr("restart", img, fault=fault)
    try:
        _wait_stopped(p)
        p.send_signal(sig)
        os.kill(p.pid, signal.SIGCONT)
        return _finish(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["TERM", "HUP", "INT"])
@pytest.mark.parametrize("point", ["restore.tree", "restore.pages@2", "restore.finished"])
def test_restart_signalled_mid_build(point, sig, hog_image):
    """SIGTERM, SIGHUP or ^C while the tree is being made: every task made
    is torn down, one line, 128 + the signal (as a shell reports that death)."""
    img, orig, exe = hog_image
    before = live_children()
    name, _, nth = point.partition("@")
    rc, out, err = _restart_signalled_at(img, f"{name}:stop" + (f"@{nth}" if nth else ""), sig)
    name = "interrupted" if sig == signal.SIGINT else f"terminated by {signal.Signals(sig).name}"
    assert (rc, err.strip(), out) == (128 + sig, f"lcr: {name}", ""), (rc, err)
    _assert_nothing_left(before, exe, orig.pid)


def test_restart_signalled_at_release_finishes(hog_image, procs):
    """SIGTERM once every task is finished: held, the tree let go whole,
    exit 0 -- never half a tree running and half killed with lcr."""
    img, orig, exe = hog_image
    rc, out, err = _restart_signalled_at(img, "restore.release:stop", signal.SIGTERM)
    assert rc == 0, err
    pid = procs.add(parse_restored_pid(out))
    assert pid == orig.pid
    assert probe_hog(pid, orig.log).ok
    kill_and_reap(pid)


def test_restart_after_the_faults(hog_image, procs):
    """Nothing half-made is in the way: the image restores at its pid."""
    img, orig, exe = hog_image
    cp = lcr("restart", img)
    pid = procs.add(parse_restored_pid(cp.stdout))
    assert pid == orig.pid
    h = probe_hog(pid, orig.log)
    assert h.ok, h.line


# --------------------------------------------------------------------------
# two restarts of one image at once

def test_second_restart_while_one_is_building(hog_image, procs):
    """The first restart stops itself with its task made at the saved pid:
    the second fails (pid in use); the first completes."""
    img, orig, exe = hog_image
    before = live_children()
    first = _popen_lcr("restart", img, fault="restore.tree:stop")
    try:
        _wait_stopped(first)
        assert exists(orig.pid)
        cp = lcr("restart", img, check=False)
        assert_clean_error(cp, "PidTaken", mentions=[str(orig.pid)], empty_stdout=True)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, out, err = _finish(first)
    assert rc == 0, err
    pid = procs.add(parse_restored_pid(out))
    assert pid == orig.pid
    assert probe_hog(pid, orig.log).ok
    assert pids_with_exe(exe) == {pid}
    kill_and_reap(pid)
    _assert_nothing_left(before, exe, orig.pid)


def test_two_restarts_race(hog_image, procs):
    img, orig, exe = hog_image
    before = live_children()
    ps = [_popen_lcr("restart", img) for _ in range(2)]
    results = [_finish(p) for p in ps]
    won = [out for rc, out, _ in results if rc == 0]
    for rc, out, _ in results:
        if rc == 0:
            procs.add(parse_restored_pid(out))
    assert len(won) == 1, f"want exactly one restart to win: {results}"
    lost = next(subprocess.CompletedProcess([], rc, out, err) for rc, out, err in results if rc)
    assert_clean_error(lost, "PidTaken", mentions=[str(orig.pid)], empty_stdout=True)
    pid = parse_restored_pid(won[0])
    assert pids_with_exe(exe) == {pid}, "a second, half-made copy exists"
    assert probe_hog(pid, orig.log).ok
    kill_and_reap(pid)
    _assert_nothing_left(before, exe, orig.pid)


# --------------------------------------------------------------------------
# a rootless restart (user + pid namespace, lcr-init) killed midway

def test_rootless_restart_killed_leaves_no_namespace(bins, tmp_path):
    rh = pytest.importorskip("rootless_helpers")
    user = rh.find_user()
    why = rh.user_can_run_lcr(user)
    if why:
        pytest.skip(why)
    wd = rh.user_workdir(user)
    log = wd / "hog.log"
    p = rh.start_as(user, [bins["memhog"], "-f", "16"], log, cwd=wd)
    try:
        helpers.wait_for_line(log, rf"^pid={p.pid} ready\b", pid=p.pid)
        img = wd / "img"
        rh.lcr_as(user, "checkpoint", p.pid, "-o", img)
        reap(p.pid)
        before = live_children()

        def inits() -> set[int]:
            return {q for q in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if (rh.comm_of(q) == "lcr-init" and
                        (helpers.proc_status(q) or {}).get("Uid", "").split()[:1] == [str(user.uid)])}
        inits_before = inits()
        for point in ("restore.tree", "restore.pages@2", "restore.finished"):
            cp = subprocess.run([*user.prefix, *LCR, "restart", str(img)], capture_output=True,
                                cwd=helpers.REPO, env=user.env({"LCR_FAULT": point}),
                                timeout=helpers.LCR_TIMEOUT)
            assert cp.returncode == -signal.SIGKILL, (point, cp.returncode, cp.stderr)
            deadline = time.monotonic() + SETTLE
            while True:
                helpers.reap_zombie_children()
                left = (live_children() - before) | (inits() - inits_before) | \
                    pids_with_exe(bins["memhog"])
                if not left:
                    break
                assert time.monotonic() < deadline, f"{point}: left behind {left}"
                time.sleep(0.05)
        cp = rh.lcr_as(user, "restart", img)
        new = parse_restored_pid(cp.stdout)
        try:
            assert probe_hog(new, log).ok
        finally:
            kill_and_reap(new)
    finally:
        kill_and_reap(p.pid)
        helpers.reap_zombie_children()
        import shutil
        shutil.rmtree(wd, ignore_errors=True)
