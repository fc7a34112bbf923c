"""The command line as a user meets it: usage errors in one `lcr:` line with
their own exit code, distinct codes for a missing image / a corrupt one /
an unknown crid, kernel threads and pid 1 refused in one line, fds sharing
a reason on one line, -o refusing an existing file without --force, no
read of an image from a terminal, --json outputs valid against their
schemas (linuxcr/results.py), and a progress bar on a terminal only."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys

import pytest

import helpers
from helpers import LCR, assert_clean_error, child_env, lcr, parse_restored_pid, reap

jsonschema = pytest.importorskip("jsonschema")


def _schemas():
    sys.path.insert(0, str(helpers.REPO))
    from linuxcr.results import SCHEMAS
    return SCHEMAS


def _valid(command: str, data) -> None:
    jsonschema.validate(data, _schemas()[command])


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    d = tmp_path / "agent"
    monkeypatch.setenv("LCR_AGENT_DIR", str(d))
    yield child_env({"LCR_AGENT_DIR": str(d)})
    try:
        os.kill(int((d / "agent.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


# --- exit codes -----------------------------------------------------------------

@pytest.mark.parametrize("args, mention", [
    (["checkpoint"], "Missing argument 'PID'"),
    (["checkpoint", "abc", "-o", "x"], "not a valid integer"),
    (["no-such-command"], "No such command"),
    (["checkpoint", "1", "--no-such-option"], "No such option"),
])
def test_usage_errors_are_one_line(args, mention):
    cp = lcr(*args, check=False)
    line = assert_clean_error(cp, "UsageError", mentions=[mention, "--help"], empty_stdout=True)
    assert line.startswith("lcr: "), line


def test_help_and_version_exit_0():
    assert lcr("--help").returncode == 0
    assert lcr("--version").stdout.startswith("lcr, version")


def test_missing_image_has_its_own_code(tmp_path):
    cp = lcr("restart", tmp_path / "nope.img", check=False)
    assert_clean_error(cp, "ImageNotFound", mentions=["nope.img", "no such image"],
                       empty_stdout=True)
    cp = lcr("show", tmp_path / "nope.img", check=False)
    assert_clean_error(cp, "ImageNotFound", mentions=["nope.img"])


def test_corrupt_image_is_image_error(tmp_path):
    bad = tmp_path / "bad.img"
    bad.write_bytes(os.urandom(4096))
    for cmd in ("restart", "show"):
        cp = lcr(cmd, bad, check=False)
        assert_clean_error(cp, "ImageError", empty_stdout=True)


def test_unknown_crid(agent_env):
    for cmd in (["discard", "nosuchcrid"], ["rollback", "nosuchcrid"]):
        cp = lcr(*cmd, check=False, env=agent_env)
        assert_clean_error(cp, "NoSuchSnapshot", mentions=["nosuchcrid", "lcr snapshots"])


def test_no_such_process():
    cp = lcr("check", "999999999", check=False)
    assert_clean_error(cp, "NoSuchProcess", mentions=["999999999"])


@pytest.mark.parametrize("pid, what", [(2, "kernel thread"), (1, "init of the pid namespace")])
def test_kernel_threads_and_init_in_one_line(pid, what):
    cp = lcr("check", pid, check=False)
    assert cp.returncode == 5, (cp.stdout, cp.stderr)
    lines = cp.stdout.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], cp.stdout
    data = json.loads(lcr("check", pid, "--json", check=False).stdout)
    _valid("check", data)
    assert len(data["reasons"]) == 1 and data["reasons"][0]["pid"] == pid
    cp = lcr("checkpoint", pid, "-o", "/dev/null", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[what])


def test_any_pid_needs_root_or_refuses_up_front(tmp_path):
    """Without root --any-pid cannot set the memory layout (PR_SET_MM_MAP):
    refused before the image is read, with the way that works."""
    import rootless_helpers as rh
    user = rh.find_user()
    if rh.user_can_run_lcr(user):
        pytest.skip(rh.user_can_run_lcr(user))
    img = tmp_path / "x.img"
    img.write_bytes(b"")
    os.chmod(tmp_path, 0o755)
    cp = rh.lcr_as(user, "restart", img, "--any-pid", check=False)
    assert_clean_error(cp, "PermissionDenied", mentions=["--any-pid", "without --any-pid"],
                       empty_stdout=True)


# --- refusals grouped -----------------------------------------------------------

def test_fds_sharing_a_reason_on_one_line(procs, tmp_path):
    """A program with fds 0, 1 and 2 on one terminal: one line, the fds listed."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(["sleep", "1000"], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True)
    finally:
        os.close(slave)
    procs.add(p.pid)
    try:
        cp = lcr("check", p.pid, check=False)
        assert cp.returncode == 5, (cp.stdout, cp.stderr)
        lines = [ln for ln in cp.stdout.splitlines() if "fds 0, 1, 2:" in ln]
        assert len(lines) == 1, cp.stdout
        data = json.loads(lcr("check", p.pid, "--json", check=False).stdout)
        _valid("check", data)
        grouped = [r for r in data["reasons"] if r["fds"] == [0, 1, 2]]
        assert grouped and grouped[0]["kind"] == "fd" and grouped[0]["fd"] is None, data
        cp = lcr("checkpoint", p.pid, "-o", tmp_path / "t.img", check=False)
        line = assert_clean_error(cp, "NotCheckpointable", mentions=["fds 0, 1, 2:"])
        assert line.count("terminal") == 1 or "fd 0:" not in line, line
    finally:
        os.close(master)


# --- -o and terminals -------------------------------------------------------------

def test_output_refuses_existing_file_unless_force(bins, procs, tmp_path):
    r = helpers.start_memhog(procs, bins, tmp_path, 8)
    img = tmp_path / "x.img"
    img.write_bytes(b"keep me")
    cp = lcr("checkpoint", r.pid, "-o", img, "--leave-running", check=False)
    assert_clean_error(cp, "ImageWriteError", mentions=[str(img), "--force"])
    assert img.read_bytes() == b"keep me"
    assert not list(tmp_path.glob("x.img.*")), "a partial file was left"
    data = json.loads(lcr("checkpoint", r.pid, "-o", img, "--force", "--json").stdout)
    _valid("checkpoint", data)
    assert data["pid"] == r.pid and data["image"] == str(img) and data["pages"] > 0
    assert data["bytes"] == img.stat().st_size
    reap(r.pid)
    cp = lcr("restart", img, "--json", "--no-progress", check=False)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    procs.add(out["pid"])
    _valid("restart", out)
    assert out["original_pid"] == r.pid
    assert helpers.probe_hog(out["pid"], r.log).ok
    shown = json.loads(lcr("show", img, "--json").stdout)
    _valid("show", shown)


@pytest.mark.parametrize("cmd", ["restart", "show"])
def test_image_from_a_terminal_is_refused(cmd):
    master, slave = pty.openpty()
    try:
        cp = subprocess.run([*LCR, cmd, "-"], stdin=slave, capture_output=True, text=True,
                            timeout=helpers.LCR_TIMEOUT, cwd=helpers.REPO)
    finally:
        os.close(slave)
        os.close(master)
    assert_clean_error(cp, "UsageError", mentions=["terminal"], empty_stdout=True)


def test_run_json(tmp_path, procs):
    cp = lcr("run", "--json", "-o", tmp_path / "log", "--", "sleep", "1000")
    data = json.loads(cp.stdout)
    procs.add(data["pid"])
    _valid("run", data)
    assert data["argv"] == ["sleep", "1000"]


def test_snapshot_json_schemas(bins, procs, tmp_path, agent_env):
    r = helpers.start_memhog(procs, bins, tmp_path, 8)
    snap = json.loads(lcr("snapshot", r.pid, "--json", env=agent_env).stdout)
    _valid("snapshot", snap)
    img = tmp_path / "wb.img"
    wb = json.loads(lcr("writeback", snap["crid"], "-o", img, "--json", env=agent_env).stdout)
    _valid("writeback", wb)
    assert wb["bytes"] == img.stat().st_size
    cp = lcr("writeback", snap["crid"], "-o", img, env=agent_env, check=False)
    assert_clean_error(cp, "ImageWriteError", mentions=["--force"])
    rb = json.loads(lcr("rollback", snap["crid"], "--json", env=agent_env).stdout)
    _valid("rollback", rb)
    assert rb["pid"] == r.pid
    rows = json.loads(lcr("snapshots", "--json", env=agent_env).stdout)
    for row in rows:
        _valid("snapshot", row)
    gone = json.loads(lcr("discard", snap["crid"], "--json", env=agent_env).stdout)
    _valid("discard", gone)


# --- progress -----------------------------------------------------------------------

def _run_on_pty(argv: list[str]) -> tuple[int, str, str]:
    """argv with stderr (and stdin) on a pseudo-terminal, stdout to a pipe:
    (exit code, what the terminal showed, stdout)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                         cwd=helpers.REPO, env=child_env({"COLUMNS": "120"}))
    os.close(slave)
    seen = b""
    while True:
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    out = p.stdout.read().decode()
    p.wait()
    p.stdout.close()
    os.close(master)
    return p.returncode, seen.decode("utf-8", "replace"), out


def test_progress_bar_on_a_terminal_only(bins, procs, tmp_path):
    """A 512 MiB image: a bar (bytes, rate) on a terminal, nothing when
    stderr is a pipe, nothing with -q on a terminal."""
    r = helpers.start_memhog(procs, bins, tmp_path, 512)
    img = tmp_path / "big.img"
    rc, shown, _ = _run_on_pty([*LCR, "checkpoint", str(r.pid), "-o", str(img), "--leave-running"])
    assert rc == 0, shown
    assert "checkpoint pid" in shown and "MiB" in shown and "/s" in shown, shown
    cp = lcr("checkpoint", r.pid, "-o", img, "--leave-running", "--force")
    assert cp.stderr == "", cp.stderr
    rc, shown, _ = _run_on_pty([*LCR, "checkpoint", str(r.pid), "-o", str(img), "--force", "-q"])
    assert rc == 0 and "checkpoint pid" not in shown, shown
    reap(r.pid)
    rc, shown, out = _run_on_pty([*LCR, "restart", str(img)])
    if out.strip().isdigit():
        procs.add(parse_restored_pid(out))
    assert rc == 0, shown
    assert "restart" in shown and "MiB" in shown, shown


def test_snapshot_context_manager(bins, procs, tmp_path, agent_env):
    """Python API: a Snapshot discards itself on exit, and rolls the process
    back first on an exception when asked."""
    import linuxcr
    r = helpers.start_memhog(procs, bins, tmp_path, 8)
    with linuxcr.snapshot(r.pid) as snap:
        assert any(s.crid == snap.crid for s in linuxcr.snapshots(r.pid))
    assert not any(s.crid == snap.crid for s in linuxcr.snapshots(r.pid))
    with pytest.raises(RuntimeError):
        with linuxcr.snapshot(r.pid).rolling_back() as snap:
            raise RuntimeError("undo")
    assert linuxcr.snapshots(r.pid) == []
    assert helpers.probe_hog(r.pid, r.log).ok
    assert issubclass(linuxcr.NoSuchSnapshot, linuxcr.LcrError)
    with pytest.raises(linuxcr.NoSuchSnapshot):
        linuxcr.discard(snap.crid)


def test_fault_injected_exit_code(bins, procs, tmp_path):
    """LCR_FAULT=<point>:raise (tests only) ends in FaultInjected's code."""
    r = helpers.start_memhog(procs, bins, tmp_path, 8)
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "f.img", check=False,
             env=child_env({"LCR_FAULT": "dump.rename:raise"}))
    assert_clean_error(cp, "FaultInjected", empty_stdout=True)
    assert not (tmp_path / "f.img").exists()
    assert helpers.probe_hog(r.pid, r.log).ok

