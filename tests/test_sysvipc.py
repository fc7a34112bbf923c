"""System V IPC (issue 17): shared memory segments attached at their
addresses with their content, semaphore sets, message queues with their
messages, all with the same ids, keys, modes and owners after restart
(tests/progs/sysv_ipc.c checks its own state).  In lcr's ipc namespace the
objects outlive a checkpointed tree, so a restart is refused until they are
gone; `lcr run --ipc` gives the tree a namespace of its own, made again on
restart.  Refused with a reason: SEM_UNDO holders, snapshots of a process
with a segment attached."""
from __future__ import annotations

import os
import random
import re
import subprocess

import pytest

import helpers
from helpers import (assert_clean_error, assert_pass, lcr, pass_field, reap, restart_image,
                     wait_for_line)
from rootless_helpers import Trees, find_user, lcr_as, root_or_user, user_can_run_lcr, user_workdir

pytestmark = pytest.mark.e2e
NAME = "sysv_ipc"


def _keys_in(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(ln.split()[0]) for ln in f.readlines()[1:]}


def _remove(key: int) -> None:
    """The test's objects in lcr's ipc namespace, by key."""
    for flag, k in (("-M", key), ("-S", key + 1), ("-Q", key + 2)):
        subprocess.run(["ipcrm", flag, str(k)], capture_output=True)


@pytest.fixture
def key():
    k = random.randrange(0x10000000, 0x3fffffff)
    yield k
    _remove(k)




def _start(procs, bins, tmp_path, key, *extra):
    log = tmp_path / "sysv.log"
    p = procs.start([bins[NAME], str(key), *extra], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
    procs.add(int(m.group(2)))
    return p.pid, int(m.group(2)), log


@pytest.mark.skipif(os.geteuid() != 0, reason="writes the host's ipc next_id sysctls")
def test_host_namespace(bins, procs, tmp_path, key):
    pid, child, log = _start(procs, bins, tmp_path, key)
    assert_pass(pid, log, NAME)
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    reap(child)
    # the objects outlive the tree: their ids are taken
    assert key in _keys_in("shm")
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=["taken", "lcr run --ipc"])
    assert not helpers.exists(pid)
    _remove(key)
    new = restart_image(img, procs)
    assert new == pid
    procs.add(child)            # the restored one (another start time): killed before its parent
    m = assert_pass(pid, log, NAME)
    word = pass_field(m, "word")
    # the child sees the word its parent wrote: one segment, not two copies
    assert pass_field(assert_pass(child, log, NAME), "word") == word
    with open(f"/proc/{pid}/maps") as f:
        sysv = [ln for ln in f if "/SYSV" in ln]
    assert len(sysv) == 4, sysv        # A split in three by mprotect, B


@pytest.mark.parametrize("who", ["root", "lcrtest"])
def test_lcr_run_ipc(bins, trees, tmp_path, key, who, request):
    user, wd = root_or_user(request, who)
    log = wd / "sysv.log"
    root = trees.add(int(lcr_as(user, "run", "--ipc", "--hostname", "ckpt-host", "-o", log, "--",
                                bins[NAME], key).stdout))
    wait_for_line(log, r"^READY pid=2 child=\d+")      # under lcr run's init (pid 1)
    word = pass_field(assert_pass(root, log, NAME), "word")
    assert key not in _keys_in("shm"), "the tree's segment is in lcr's ipc namespace"
    img = wd / "img"
    lcr_as(user, "checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr_as(user, "restart", img).stdout))
    m = assert_pass(new, log, NAME)
    assert pass_field(m, "word") == word + 1     # the segment's content came back
    assert key not in _keys_in("shm")
    assert os.stat(f"/proc/{new}/ns/ipc").st_ino != os.stat("/proc/self/ns/ipc").st_ino
    if os.geteuid() == 0 and subprocess.run(["which", "nsenter"], capture_output=True).returncode == 0:
        host = subprocess.run(["nsenter", "-t", str(new), "-u", "hostname"], capture_output=True,
                              text=True).stdout.strip()
        assert host == "ckpt-host"


@pytest.mark.skipif(os.geteuid() != 0, reason="the program's objects are root's")
def test_sem_undo_refused(bins, procs, tmp_path, key):
    pid, child, log = _start(procs, bins, tmp_path, key, "undo")
    cp = lcr("check", pid, check=False)
    assert cp.returncode == helpers.error_exit_code("NotCheckpointable"), cp
    assert re.search(rf"^pid {pid}: .*SEM_UNDO", cp.stdout, re.M), cp.stdout
    # the child (fork does not inherit undo lists) is not refused
    assert f"child pid {child}" not in cp.stdout
    cp = lcr("checkpoint", pid, "-o", tmp_path / "img", check=False)
    assert cp.returncode != 0 and "SEM_UNDO" in cp.stderr
    assert helpers.alive(pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="the program's objects are root's")
def test_snapshot_taken(bins, procs, tmp_path, key, agent_env):
    """Snapshots keep the segments' content (was refused; rollback and
    writeback: tests/test_sysv_snapshots.py)."""
    pid, child, log = _start(procs, bins, tmp_path, key)
    assert lcr("check", pid).returncode == 0
    cp = lcr("snapshot", pid, env=agent_env, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert_pass(pid, log, NAME)


def _pg_bin(name: str) -> str | None:
    """A postgres program: on PATH, or where Debian's packages put them."""
    import glob
    import shutil
    found = shutil.which(name)
    if found:
        return found
    got = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return got[-1] if got else None


def _psql(user, sock, *sql: str) -> str:
    argv = [*user.prefix, _pg_bin("psql"), "-X", "-A", "-t", "-h", str(sock), "-U", "postgres",
            "-d", "postgres"]
    for s in sql:
        argv += ["-c", s]
    cp = subprocess.run(argv, capture_output=True, text=True, env=user.env(), timeout=120)
    assert cp.returncode == 0, f"psql {sql}: {cp.stderr}"
    return cp.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="postgres runs as lcrtest under a root `lcr run`")
def test_postgres(trees, tmp_path):
    """A real program: the postmaster and its workers share a System V
    segment, an anonymous shared area (the buffer pool, written by workers
    that are gone) and POSIX shared memory; checkpointed as a tree in an
    ipc namespace of its own, restarted, queried."""
    if not all(_pg_bin(p) for p in ("initdb", "postgres", "psql")):
        pytest.skip("postgresql not installed (apt-get install postgresql)")
    user = find_user()
    why = user_can_run_lcr(user)
    if why:
        pytest.skip(why)
    wd = user_workdir(user)
    data, sock = wd / "data", wd / "sock"
    cp = subprocess.run([*user.prefix, _pg_bin("initdb"), "-D", data, "-A", "trust",
                         "-U", "postgres", "--no-sync"], capture_output=True, text=True, env=user.env(), timeout=300)
    assert cp.returncode == 0, cp.stderr
    sock.mkdir()
    os.chown(sock, user.uid, user.gid)
    log = wd / "pg.log"
    root = trees.add(int(lcr("run", "--ipc", "-o", log, "--", *user.prefix, _pg_bin("postgres"), "-D", data,
                             "-k", sock, "-c", "listen_addresses=",
                             "-c", "shared_buffers=16MB").stdout))
    wait_for_line(log, r"database system is ready to accept connections")
    _psql(user, sock, "create table t(x int)", "insert into t select generate_series(1, 1000)")
    img = wd / "img"
    lcr("checkpoint", root, "-o", img)
    reap(root)
    # (lcr run's init, pid 1, runs as root with its capabilities; the image
    # lies in lcrtest's directory, so root names what it grants)
    new = trees.add(int(lcr("restart", img, "--trust", "uid,files,caps").stdout))
    out = _psql(user, sock, "insert into t values (0)", "select count(*), sum(x) from t",
                "checkpoint")
    assert "1001|500500" in out, out
    from rootless_helpers import children
    postmaster = children(new)[0]       # under lcr run's init (the pid restart printed)
    with open(f"/proc/{postmaster}/maps") as f:
        assert "/SYSV" in f.read(), "the postmaster's System V segment is not attached"
