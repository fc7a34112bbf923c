"""End to end: checkpoint and restart single processes with the lcr CLI and
the Python API, and check that the restored process is intact (each test
program verifies its own state when probed with SIGUSR1).

test_progs_selfcheck does not use lcr: it proves the test programs pass on
their own, so a FAIL after a restore is the restore's fault.
"""
from __future__ import annotations

import json
import subprocess
import threading

import pytest

import helpers
from helpers import (LCR, LCR_TIMEOUT, PROGRAMS, CHECKPOINTABLE,
                     assert_running_untraced, checkpoint_kill_restart, kill_and_reap,
                     last_heartbeat, lcr, parse_restored_pid, pass_field, probe_hog,
                     reap, restart_image, start_memhog, start_prog, start_pyhog,
                     wait_heartbeat_after, wait_state)

ids = lambda progs: [p.id for p in progs]  # noqa: E731
REAP_JOIN = 30


# --------------------------------------------------------------------------
# the programs alone (green without lcr)

@pytest.mark.parametrize("prog", list(PROGRAMS.values()), ids=ids(PROGRAMS.values()))
def test_progs_selfcheck(prog, bins, procs, tmp_path):
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    if prog.heartbeat:
        wait_heartbeat_after(r.log, last_heartbeat(r.log), r.pid)
    r.assert_pass()
    assert_running_untraced(r.pid)


def test_progs_selfcheck_memhog(bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, 16)
    a = probe_hog(r.pid, r.log)
    b = probe_hog(r.pid, r.log)
    assert a.ok and b.ok, (a.line, b.line)
    assert b.counter > a.counter


def test_progs_selfcheck_pyhog(procs, tmp_path):
    r = start_pyhog(procs, tmp_path, 16)
    assert "backend=numpy" in r.ready, r.ready
    a = probe_hog(r.pid, r.log)
    b = probe_hog(r.pid, r.log)
    assert a.ok and b.ok, (a.line, b.line)
    assert b.counter > a.counter
    assert helpers.proc_status(r.pid)["Threads"] == "1"


def test_pynumpy_is_single_threaded(bins, procs, tmp_path):
    r = start_prog(procs, "pynumpy", bins, tmp_path)
    assert "threads=1" in r.ready, r.ready


# --------------------------------------------------------------------------
# checkpoint (kill) + restart, one program at a time

@pytest.mark.e2e
@pytest.mark.parametrize("prog", CHECKPOINTABLE, ids=ids(CHECKPOINTABLE))
def test_checkpoint_restart(prog, bins, procs, tmp_path):
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    hb = last_heartbeat(r.log) if prog.heartbeat else 0
    new = checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    assert new == r.pid, f"restored as pid {new}, was {r.pid} (and it was free)"
    assert_running_untraced(new)
    if prog.heartbeat:
        wait_heartbeat_after(r.log, hb, new)
    r.assert_pass()


@pytest.mark.e2e
@pytest.mark.parametrize("prog_id", ["counter", "fpu", "sleeper-long", "sleeper-short",
                                     "threads", "pycount"])
def test_repeated_checkpoint_restart(prog_id, bins, procs, tmp_path):
    """A restored process can be checkpointed again, and again; each dump
    lands at another point of its loop (fpu: inside the asm, sleeper: inside
    another kind of blocking call)."""
    prog = PROGRAMS[prog_id]
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    for cycle in range(3):
        if prog.heartbeat:
            wait_state(r.pid, "S")          # blocked in a system call
        hb = last_heartbeat(r.log)
        new = checkpoint_kill_restart(r.pid, tmp_path / f"img{cycle}", procs)
        assert new == r.pid
        if prog.heartbeat:
            wait_heartbeat_after(r.log, hb, new)
        r.assert_pass()


@pytest.mark.e2e
def test_counter_keeps_counting(bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    before = pass_field(r.assert_pass(), "count")
    checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    after = pass_field(r.assert_pass(), "count")
    assert after > before


@pytest.mark.e2e
def test_files_state_continues_in_files(bins, procs, tmp_path):
    """The probes' writes land in the files, before and after the restore."""
    r = start_prog(procs, "files", bins, tmp_path)
    r.assert_pass()
    checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    r.assert_pass()
    d = tmp_path / "files-dir"
    lines = (d / "append.txt").read_text().splitlines()
    assert lines == ["first line", f"probe 1 pid {r.pid}", f"probe 2 pid {r.pid}"]
    rdwr = (d / "rdwr.dat").read_bytes()
    assert rdwr[4000:].startswith(f"[probe 1 pid {r.pid}][probe 2 pid {r.pid}]".encode())


# --------------------------------------------------------------------------
# memhog / pyhog

@pytest.mark.e2e
@pytest.mark.parametrize("mib", [64, 256])
def test_memhog(mib, bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, mib)
    a = probe_hog(r.pid, r.log)
    assert a.ok, a.line
    new = checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    assert new == r.pid
    b = probe_hog(new, r.log)
    assert b.ok, f"after restore: {b.line}"
    assert b.counter > a.counter


@pytest.mark.e2e
def test_pyhog(procs, tmp_path):
    r = start_pyhog(procs, tmp_path, 64)
    a = probe_hog(r.pid, r.log)
    assert a.ok, a.line
    new = checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    assert new == r.pid
    b = probe_hog(new, r.log)
    assert b.ok, f"after restore: {b.line}"
    assert b.counter > a.counter


# --------------------------------------------------------------------------
# options: --leave-running, -o - | restart -, --compress

@pytest.mark.e2e
def test_leave_running(bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    assert_running_untraced(r.pid)
    r.assert_pass()                        # the original goes on
    kill_and_reap(r.pid)
    new = restart_image(img, procs)
    assert new == r.pid
    r.assert_pass()


@pytest.mark.e2e
def test_pipe_checkpoint_into_restart(bins, procs, tmp_path):
    """lcr checkpoint PID -o - | lcr restart -"""
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    # the original is our child: reap it the moment the dump kills it, so
    # its pid is free for the restore reading the other end of the pipe
    reaper = threading.Thread(target=reap, args=(r.pid, LCR_TIMEOUT), daemon=True)
    reaper.start()
    with open(tmp_path / "ckpt.err", "w+b") as e1, open(tmp_path / "restart.err", "w+b") as e2:
        p1 = subprocess.Popen([*LCR, "checkpoint", str(r.pid), "-o", "-"],
                              stdout=subprocess.PIPE, stderr=e1)
        p2 = subprocess.Popen([*LCR, "restart", "-"], stdin=p1.stdout,
                              stdout=subprocess.PIPE, stderr=e2)
        p1.stdout.close()
        try:
            out, _ = p2.communicate(timeout=LCR_TIMEOUT)
            p1.wait(timeout=LCR_TIMEOUT)
        finally:
            for p in (p1, p2):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if p2.returncode == 0 and out.strip().isdigit():
            procs.add(int(out))
        e1.seek(0)
        e2.seek(0)
        err1, err2 = e1.read().decode(), e2.read().decode()
    reaper.join(timeout=REAP_JOIN)
    assert p1.returncode == 0, f"checkpoint -o - exited {p1.returncode}: {err1}"
    assert p2.returncode == 0, f"restart - exited {p2.returncode}: {err2}"
    new = parse_restored_pid(out)
    assert new == r.pid
    r.assert_pass()


@pytest.mark.e2e
def test_compressed_image(bins, procs, tmp_path):
    r = start_prog(procs, "mem", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img.z"
    new = checkpoint_kill_restart(r.pid, img, procs, ckpt_args=["--compress"])
    assert new == r.pid
    r.assert_pass()
    data = json.loads(lcr("show", img, "--json").stdout)
    assert any(t.get("pid") == r.pid for t in data["tasks"])


@pytest.mark.e2e
def test_compressed_image_is_smaller(bins, procs, tmp_path):
    """--compress really compresses: a CPython heap is (memhog's and
    counter's random buffers would not be)."""
    r = start_prog(procs, "pycount", bins, tmp_path)
    r.assert_pass()
    plain, packed = tmp_path / "plain.img", tmp_path / "packed.img"
    lcr("checkpoint", r.pid, "-o", plain, "--leave-running")
    lcr("checkpoint", r.pid, "-o", packed, "--leave-running", "--compress")
    assert packed.stat().st_size < plain.stat().st_size


# --------------------------------------------------------------------------
# lcr show

@pytest.fixture
def counter_image(bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    return r, img


@pytest.mark.e2e
def test_show_text(counter_image):
    r, img = counter_image
    out = lcr("show", img).stdout
    assert str(r.pid) in out
    assert "counter" in out, "the memory areas (the program's own mapping) are not shown"


@pytest.mark.e2e
def test_show_json(counter_image):
    r, img = counter_image
    data = json.loads(lcr("show", img, "--json").stdout)
    tasks = data["tasks"]
    assert isinstance(tasks, list) and tasks
    task = next((t for t in tasks if t.get("pid") == r.pid), None)
    assert task is not None, f"no task with pid {r.pid} in {[t.get('pid') for t in tasks]}"
    vmas = task["vmas"]
    assert isinstance(vmas, list) and len(vmas) >= 5, vmas
    assert "counter" in json.dumps(vmas), "the program's own mapping is not among the vmas"


# --------------------------------------------------------------------------
# the Python API

def _api():
    import linuxcr
    return linuxcr


@pytest.mark.e2e
def test_api_path(bins, procs, tmp_path):
    linuxcr = _api()
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    linuxcr.checkpoint(r.pid, str(img))
    reap(r.pid)
    new = procs.add(linuxcr.restart(str(img)))
    assert isinstance(new, int) and new == r.pid
    r.assert_pass()


@pytest.mark.e2e
def test_api_fd(bins, procs, tmp_path):
    linuxcr = _api()
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    with open(img, "wb") as f:
        linuxcr.checkpoint(r.pid, f.fileno())
    reap(r.pid)
    assert img.stat().st_size > 0
    with open(img, "rb") as f:
        new = procs.add(linuxcr.restart(f.fileno()))
    assert new == r.pid
    r.assert_pass()


@pytest.mark.e2e
def test_api_leave_running(bins, procs, tmp_path):
    linuxcr = _api()
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    linuxcr.checkpoint(r.pid, str(img), leave_running=True)
    assert_running_untraced(r.pid)
    r.assert_pass()
    kill_and_reap(r.pid)
    new = procs.add(linuxcr.restart(str(img)))
    assert new == r.pid
    r.assert_pass()
