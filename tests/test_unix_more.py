"""End to end: UNIX sockets in every state (issue 16, second part).

Programs: tests/progs/sock_unix_states.c (unconnected stream/dgram/seqpacket,
abstract names, shutdown state, SO_PASSCRED, SO_PEEK_OFF, buffer sizes),
sock_unix_inflight.c (SCM_RIGHTS and SCM_CREDENTIALS in flight, datagrams
keeping their sender's name), sock_unix_backlog.c (a listener with
connections not accepted yet).  Each runs as root and as lcrtest.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import helpers
from helpers import assert_pass, lcr, reap, wait_for_line
from rootless_helpers import Trees, find_user, lcr_as, nspid, start_as, user_can_run_lcr, user_workdir
from test_fdkinds_more import _cycle, _no_internal, _start

pytestmark = pytest.mark.e2e

PROGS = {
    "sock_unix_states": lambda b, d: [b["sock_unix_states"], d],
    "sock_unix_inflight": lambda b, d: [b["sock_unix_inflight"], d],
    "sock_unix_backlog": lambda b, d: [b["sock_unix_backlog"], d],
}


@pytest.mark.parametrize("name", list(PROGS))
def test_as_root(name, bins, procs, tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    r = _start(procs, PROGS[name](bins, d), tmp_path / f"{name}.log")
    assert_pass(r.pid, r.log, name)
    _cycle(r, name, tmp_path, procs)








@pytest.mark.parametrize("name", list(PROGS))
def test_as_user(name, user, wd, bins, trees):
    d = wd / "s"
    d.mkdir()
    os.chown(d, user.uid, user.uid)
    log = wd / f"{name}.log"
    p = start_as(user, PROGS[name](bins, d), log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, r"^READY pid=(\d+)", pid=p.pid)
    assert_pass(p.pid, log, name)
    pid = p.pid
    for c in range(2):
        cp = lcr_as(user, "checkpoint", pid, "-o", wd / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        reap(pid)
        cp = lcr_as(user, "restart", wd / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        pid = int(cp.stdout)
        st = helpers.proc_status(pid)
        init = int(st["PPid"]) if st else 0
        if init > 1 and init != os.getpid() and nspid(init)[-1] == 1:
            trees.add(init)
        trees.add(pid)
        assert nspid(pid)[-1] == p.pid
        assert_pass(pid, log, name)


def test_backlog_with_data_refused(bins, procs, tmp_path):
    """A client that already sent bytes to a connection not accepted yet:
    refused in one line naming pid, fd, listener and the way out."""
    d = tmp_path / "s"
    d.mkdir()
    r = _start(procs, [bins["sock_unix_backlog"], d, "data"], tmp_path / "bl.log")
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    lines = [ln for ln in cp.stdout.splitlines() if "listening" in ln]
    assert len(lines) == 1, cp.stdout
    assert f"pid {r.pid}" in lines[0] and "fd 3" in lines[0] and str(d / "l") in lines[0] and \
        "has sent data" in lines[0] and "until the program accepts them" in lines[0], lines[0]
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", check=False)
    _no_internal(cp)
    assert cp.returncode != 0 and not (tmp_path / "img").exists()
    helpers.assert_running_untraced(r.pid)


def test_socket_file_replaced_refused(bins, procs, tmp_path):
    """A regular file took the place of a bound socket's file: refused in
    one line with pid, fd, the path and the way out."""
    d = tmp_path / "s"
    d.mkdir()
    r = _start(procs, [bins["sock_unix_states"], d, "replaced"], tmp_path / "st.log")
    assert_pass(r.pid, r.log, "sock_unix_states")
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    lines = [ln for ln in cp.stdout.splitlines() if "took the place" in ln]
    assert len(lines) == 1, cp.stdout
    assert f"pid {r.pid}" in lines[0] and str(d / "gone") in lines[0] and "remove that file" in lines[0]
    helpers.assert_running_untraced(r.pid)
