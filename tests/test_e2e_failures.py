"""End to end: what lcr must refuse, and how.

Every failure is a non-zero exit with the code of its linuxcr.errors class,
ONE line on stderr naming the cause, no Python traceback; a checkpoint that
fails leaves the process running, untraced and intact (it still PASSes its
probe) and leaves no image file behind; a restart that fails leaves no
process behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import re
import sys
import tempfile
from pathlib import Path

import pytest

import helpers
from helpers import (as_user, assert_clean_error, assert_running_untraced, exists,
                     free_pid, kill_and_reap, lcr, live_children, parse_restored_pid,
                     pids_with_exe, probe_hog, restart_image, start_memhog, start_prog)

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------
# checkpoint refused

def test_checkpoint_no_such_pid(tmp_path):
    pid = free_pid()
    img = tmp_path / "img"
    cp = lcr("checkpoint", pid, "-o", img, check=False)
    assert_clean_error(cp, "NoSuchProcess", mentions=[str(pid)])
    assert not img.exists()


def test_checkpoint_of_unsupported_file_refused(bins, procs, tmp_path):
    """A process holding an fd lcr cannot save (io_uring): refused, and the
    process is left as it was."""
    r = start_prog(procs, "unsupported", bins, tmp_path)
    kind = re.search(r"kind=(\S+)", r.ready).group(1)
    r.assert_pass()
    img = tmp_path / "img"
    cp = lcr("checkpoint", r.pid, "-o", img, check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), kind])
    assert_running_untraced(r.pid)
    assert not img.exists(), "a refused checkpoint left an image file"
    r.assert_pass()


def test_checkpoint_of_traced_process_refused(bins, procs, tmp_path):
    """Someone else (a debugger: progs/tracer.c) already traces the process:
    Busy; the other tracer keeps it, and once it is gone the process runs
    on intact."""
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    log = tmp_path / "tracer.log"
    tracer = procs.start([bins["tracer"], r.pid], log)
    helpers.wait_for_line(log, rf"^READY pid={tracer.pid} tracee={r.pid}\b", pid=tracer.pid)
    assert helpers.proc_status(r.pid)["TracerPid"] == str(tracer.pid)
    r.assert_pass()                        # traced, still fine
    img = tmp_path / "img"
    cp = lcr("checkpoint", r.pid, "-o", img, check=False)
    assert_clean_error(cp, "Busy", mentions=[str(r.pid)])
    assert not img.exists(), "a refused checkpoint left an image file"
    assert helpers.proc_status(r.pid)["TracerPid"] == str(tracer.pid)
    kill_and_reap(tracer.pid)
    assert_running_untraced(r.pid)
    r.assert_pass()


def test_checkpoint_into_missing_directory(bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "no" / "such" / "dir" / "img"
    cp = lcr("checkpoint", r.pid, "-o", img, check=False)
    line = assert_clean_error(cp, "ImageWriteError")
    assert str(img.parent) in line or "no such file" in line.lower(), line
    assert_running_untraced(r.pid)
    r.assert_pass()
    assert not (tmp_path / "no").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a place where the disk fills up."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_checkpoint_disk_full(bins, procs, tmp_path, small_tmpfs):
    r = start_memhog(procs, bins, tmp_path, 64)
    assert probe_hog(r.pid, r.log).ok
    cp = lcr("checkpoint", r.pid, "-o", small_tmpfs / "img", check=False)
    assert_clean_error(cp, "ImageWriteError", match=r"no space|disk full|ENOSPC")
    assert os.listdir(small_tmpfs) == [], "a partial image was left behind"
    assert_running_untraced(r.pid)
    h = probe_hog(r.pid, r.log)
    assert h.ok, h.line


NOBODY = 65534
OTHER = 65533


def test_checkpoint_permission_denied(bins, procs, tmp_path):
    """A process of user nobody, checkpointed by another ordinary user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run processes as other users")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not found")
    r = start_prog(procs, "counter", bins, tmp_path, prefix=as_user(NOBODY))
    assert helpers.proc_status(r.pid)["Uid"].split()[0] == str(NOBODY)
    r.assert_pass()
    out = Path(tempfile.mkdtemp(prefix="lcr-perm-"))
    try:
        os.chown(out, OTHER, OTHER)
        cp = helpers.lcr_as(OTHER, "checkpoint", r.pid, "-o", out / "img", cwd=out)
        assert_clean_error(cp, "PermissionDenied", mentions=[str(r.pid)],
                           match=r"permi|denied|not allowed|may not|EPERM")
        assert os.listdir(out) == [], "a refused checkpoint left an image file"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert_running_untraced(r.pid)
    r.assert_pass()


# --------------------------------------------------------------------------
# restart refused

@pytest.fixture(scope="module")
def counter_image(bins, tmp_path_factory):
    """A good image of counter (taken with --leave-running), the original
    then killed so its pid is free: a corrupt image must fail on its own."""
    tmp = tmp_path_factory.mktemp("counter-image")
    reg = helpers.Procs()
    try:
        r = start_prog(reg, "counter", bins, tmp)
        r.assert_pass()
        img = tmp / "good.img"
        lcr("checkpoint", r.pid, "-o", img, "--leave-running")
        kill_and_reap(r.pid)
        yield img.read_bytes(), r, bins["counter"]
    finally:
        reg.kill_all()


def _flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


CORRUPTIONS = {
    "empty": lambda d: b"",
    "truncated-in-header": lambda d: d[:8],
    "truncated-at-third": lambda d: d[: len(d) // 3],
    "truncated-at-half": lambda d: d[: len(d) // 2],
    "truncated-last-byte": lambda d: d[:-1],
    "bad-magic": lambda d: _flip(_flip(d, 0, 0xFF), 1, 0xFF),
    "byte-flipped-in-middle": lambda d: _flip(d, len(d) // 2),
    "byte-flipped-near-end": lambda d: _flip(d, len(d) - 64),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_restart_corrupt_image(kind, counter_image, procs, tmp_path):
    data, orig, exe = counter_image
    bad = tmp_path / f"{kind}.img"
    bad.write_bytes(CORRUPTIONS[kind](data))
    before = pids_with_exe(exe) | live_children()
    cp = lcr("restart", bad, check=False)
    if cp.returncode == 0 and cp.stdout.strip().isdigit():
        procs.add(int(cp.stdout))           # killed at teardown
    left = (pids_with_exe(exe) | live_children()) - before
    held = exists(orig.pid) and helpers.proc_status(orig.pid)
    for pid in left | ({orig.pid} if held else set()):
        procs.add(pid)                      # ours now (subreaper): reaped at teardown
    assert_clean_error(cp, "ImageError", empty_stdout=True)
    assert not left, f"a failed restart left processes behind: {sorted(left)}"
    assert not held, (f"pid {orig.pid} is held after a failed restart (state "
                      f"{held['State']}, parent {held['PPid']}): a zombie lcr did not reap?")


def test_restart_good_image_control(counter_image, procs, tmp_path):
    """The image the corrupt ones come from restores fine."""
    data, orig, exe = counter_image
    img = tmp_path / "good.img"
    img.write_bytes(data)
    new = restart_image(img, procs)
    assert new == orig.pid
    orig.assert_pass()


def test_restart_pid_taken(bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    cp = lcr("restart", img, check=False)
    if cp.returncode == 0 and cp.stdout.strip().isdigit():
        procs.add(int(cp.stdout))
    assert_clean_error(cp, "PidTaken", mentions=[str(r.pid)], empty_stdout=True)
    assert_running_untraced(r.pid)
    r.assert_pass()

    cp = lcr("restart", img, "--any-pid")
    new = procs.add(parse_restored_pid(cp.stdout))
    assert new != r.pid
    r.assert_pass(new)           # the copy (same log file, its own pid)
    r.assert_pass()              # and the original


def test_restart_any_pid_with_pending_signals(bins, procs, tmp_path):
    """--any-pid: the pending signals are queued to the task's new pid (not
    to the saved one, which here is the original process, still running).
    (The copy's own probe would fail: the program checks it kept its pid.)"""
    r = start_prog(procs, "signals", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    cp = lcr("restart", img, "--any-pid")
    new = procs.add(parse_restored_pid(cp.stdout))
    assert new != r.pid
    assert_running_untraced(new)
    r.assert_pass()               # the original got nothing of the copy's signals
