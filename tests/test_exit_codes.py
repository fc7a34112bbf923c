"""Every exit code of errors.EXIT_CODES provoked for real: the CLI (or, for
RolledBack, the Python API) on a real process, one `lcr:` line on stderr
and the code of the error's class.  The codes already provoked elsewhere
(test_cli_ux.py, test_e2e_failures.py, ...) are not repeated here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

import helpers
from helpers import LCR, assert_clean_error, child_env, lcr

INTERRUPTED = 130


def _until(cond: Callable[[], object], what: str, bound: float = helpers.READY_TIMEOUT) -> None:
    """Poll ``cond`` until true; ``bound`` is a safety bound only."""
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {bound} s: {what}")
        time.sleep(0.01)


def _in_read_of_stdin(pid: int) -> bool:
    """``pid`` is blocked in read(2)/readv(2) of fd 0 (/proc/PID/syscall:
    number, then the first argument)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("0", "19") and int(fields[1], 16) == 0


def test_interrupted_restart_from_stdin(tmp_path):
    """`lcr restart -` reading from a pipe nobody writes to: ^C ends it with
    `lcr: interrupted` and 130 -- also when it inherited SIGINT ignored (a
    shell script's background job), where Python installs no handler and
    the read could not be interrupted."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen([*LCR, "restart", "-"], stdin=r, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    finally:
        os.close(r)
    try:
        _until(lambda: _in_read_of_stdin(p.pid) or p.poll() is not None,
               "lcr restart - blocked reading stdin")
        assert p.poll() is None, p.stderr.read().decode()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    finally:
        os.close(w)
        if p.poll() is None:
            p.kill()
            p.wait()
    cp = subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())
    line = assert_clean_error(cp, mentions=["interrupted"], empty_stdout=True)
    assert cp.returncode == INTERRUPTED, line
    assert line == "lcr: interrupted"
