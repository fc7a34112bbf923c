"""Pipes leading out of the checkpointed tree (resources/external.py):
named and refused by default; `checkpoint --external` + `restart --fd N=...`
hands the restored process a new file for that fd."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from helpers import (LCR, assert_clean_error, have_gcc, lcr, parse_restored_pid, reap,
                     wait_for_line)

pytestmark = pytest.mark.e2e

SOLO = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (long i = 0;; i++) { printf("tick %ld\n", i); fflush(stdout); usleep(20000); }
}
"""


@pytest.fixture
def ticker(tmp_path):
    if not have_gcc():
        pytest.skip("gcc not found")
    (tmp_path / "t.c").write_text(SOLO)
    subprocess.run(["gcc", "-O1", tmp_path / "t.c", "-o", tmp_path / "ticker"], check=True)
    return tmp_path / "ticker"


def _pipeline(procs, ticker, out):
    """`ticker | cat > out`, both started by us; only ticker is checkpointed."""
    with open(out, "wb") as f:
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=f, start_new_session=True)
    procs.add(cat.pid)
    prog = subprocess.Popen([ticker], stdout=cat.stdin, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    procs.add(prog.pid)
    cat.stdin.close()                      # the pipe's ends: prog (write) and cat (read) only
    wait_for_line(out, r"^tick 3$", pid=prog.pid)
    return prog, cat


def test_external_pipe_is_named_and_refused(ticker, procs, tmp_path):
    prog, cat = _pipeline(procs, ticker, tmp_path / "out")
    cp = lcr("check", prog.pid, check=False)
    assert cp.returncode == 5
    line = next(ln for ln in cp.stdout.splitlines() if "external connection" in ln)
    assert re.search(rf"fd 1: external connection: pipe:\[\d+\] \(write end\), other end held "
                     rf"outside the tree by pid {cat.pid} \(cat\) fd 0", line), line
    assert "--external" in line and "--fd 1=" in line
    cp = lcr("checkpoint", prog.pid, "-o", tmp_path / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[f"pid {cat.pid}", "--external"])
    assert prog.poll() is None                # left running as it was
    assert not (tmp_path / "img").exists()


def test_external_pipe_restart_with_new_files(ticker, procs, tmp_path):
    prog, cat = _pipeline(procs, ticker, tmp_path / "out")
    img = tmp_path / "img"
    lcr("checkpoint", prog.pid, "-o", img, "--external")
    prog.wait()
    cat.wait()                                 # EOF: its writer is gone
    # not given: refused, naming the option
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=["fd 1", "external", "--fd 1="])
    # a file: the output goes on there
    log = tmp_path / "after.log"
    cp = lcr("restart", img, "--fd", f"1={log}")
    pid = procs.add(parse_restored_pid(cp.stdout))
    m = wait_for_line(log, r"^tick (\d+)$", pid=pid)
    last = int(open(tmp_path / "out").read().split()[-1])
    assert int(m.group(1)) == last + 1, (m.group(0), last)     # nothing lost, nothing twice
    # a file is no external connection: --fd for it is refused, not ignored
    lcr("checkpoint", pid, "-o", tmp_path / "img2", "--external")
    reap(pid)
    cp = lcr("restart", tmp_path / "img2", "--fd", "1=-", check=False)
    assert_clean_error(cp, "RestoreError", mentions=["--fd 1", "not an external connection"])
    # &M: a new pipeline; lcr inherited the write end of a new cat
    out2 = tmp_path / "out2"
    with open(out2, "wb") as f:
        cat2 = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=f, start_new_session=True)
    procs.add(cat2.pid)
    w = cat2.stdin.fileno()
    try:
        cp = subprocess.run([*LCR, "restart", img, "--fd", f"1=&{w}"], pass_fds=(w,),
                            capture_output=True, timeout=120)
    finally:
        cat2.stdin.close()
    assert cp.returncode == 0, cp.stderr
    pid2 = procs.add(parse_restored_pid(cp.stdout.decode()))
    m2 = wait_for_line(out2, r"^tick (\d+)$", pid=pid2)
    assert m2.group(1) == m.group(1)           # the same image: it goes on from the same tick
    assert os.readlink(f"/proc/{pid2}/fd/1").startswith("pipe:")
