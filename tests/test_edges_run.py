"""`lcr run` without -o never holds the caller's stdout; its init forwards
signals and exits with the command's status; `lcr restart --wait` stays,
forwards signals and exits with the restored root's status."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import LCR, REPO, lcr, parse_restored_pid, reap, wait_for_line

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_run_in_command_substitution(tmp_path, procs):
    """`pid=$(lcr run -- CMD)`: the shell gets the pid as soon as lcr exits,
    because CMD holds a log file, not the shell's pipe."""
    env = {**os.environ, "LCR_RUN_LOGS": str(tmp_path / "logs"), "PYTHONPATH": str(REPO)}
    lcr_cmd = " ".join(LCR)
    cp = subprocess.run(["bash", "-c", f"pid=$({lcr_cmd} run -- sh -c 'echo hello; exec sleep 1000'); "
                                       "echo got $pid"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert cp.returncode == 0, cp.stderr
    pid = procs.add(int(re.fullmatch(r"got (\d+)\n", cp.stdout).group(1)))
    log = tmp_path / "logs" / f"{pid}.log"
    assert cp.stderr.strip() == f"lcr: output of pid {pid} goes to {log}", cp.stderr
    wait_for_line(log, r"^hello$", pid=pid)
    cmd = _children(pid)[0]
    for fd in (1, 2):
        assert os.readlink(f"/proc/{cmd}/fd/{fd}") == str(log)
    assert os.readlink(f"/proc/{cmd}/fd/0") == "/dev/null"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_init_forwards_signals(sig, tmp_path, procs):
    log = tmp_path / "log"
    prog = tmp_path / "p.py"
    prog.write_text("import signal, sys, time\n"
                    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                    "    signal.signal(s, lambda n, f: (print('got', n, flush=True), sys.exit(40 + n)))\n"
                    "print('READY', flush=True)\n"
                    "while True: time.sleep(1)\n")
    pid = procs.add(int(lcr("run", "-o", log, "--", sys.executable, prog).stdout))
    wait_for_line(log, r"^READY", pid=pid)
    os.kill(pid, sig)
    wait_for_line(log, rf"^got {int(sig)}$")
    status = reap(pid)
    assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 40 + sig


def test_run_init_exit_status_and_exec_failure(tmp_path, procs):
    pid = procs.add(int(lcr("run", "-o", tmp_path / "log", "--", "sh", "-c", "exit 7").stdout))
    status = reap(pid)
    assert status is not None and os.WEXITSTATUS(status) == 7
    cp = lcr("run", "-o", tmp_path / "log", "--", str(tmp_path / "no-such-program"), check=False)
    assert cp.returncode != 0
    assert cp.stderr.strip().startswith("lcr: cannot run ") and "No such file" in cp.stderr, cp.stderr


WAITER = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda n, f: sys.exit(3))
i = 0
while True:
    print("tick", i, flush=True)
    i += 1
    time.sleep(0.05)
"""


def _saved(tmp_path, procs):
    prog = tmp_path / "w.py"
    prog.write_text(WAITER)
    log = tmp_path / "log"
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, prog], stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
    procs.add(p.pid)
    wait_for_line(log, r"^tick 3$", pid=p.pid)
    img = tmp_path / "img"
    lcr("checkpoint", p.pid, "-o", img)
    p.wait()
    return img, log


def _restart_waiting(img, procs):
    lp = subprocess.Popen([*LCR, "restart", img, "--wait"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    pid = procs.add(parse_restored_pid(lp.stdout.readline()))
    return lp, pid


def test_restart_wait_exit_status(tmp_path, procs):
    img, log = _saved(tmp_path, procs)
    lp, pid = _restart_waiting(img, procs)
    n = os.path.getsize(log)
    wait_for_line(log, r"^tick \d+$", start=n, pid=pid)
    assert lp.poll() is None                     # still in the foreground
    lp.send_signal(signal.SIGUSR1)               # forwarded: the program exits 3
    assert lp.wait(timeout=120) == 3, lp.stderr.read()
    assert not os.path.exists(f"/proc/{pid}")    # lcr reaped it


def test_restart_wait_forwards_sigterm(tmp_path, procs):
    img, log = _saved(tmp_path, procs)
    lp, pid = _restart_waiting(img, procs)
    wait_for_line(log, r"^tick \d+$", start=os.path.getsize(log), pid=pid)
    lp.send_signal(signal.SIGTERM)               # the program dies of it; lcr too
    assert lp.wait(timeout=120) == -signal.SIGTERM
    assert not os.path.exists(f"/proc/{pid}")
