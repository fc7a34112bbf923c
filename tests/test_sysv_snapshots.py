"""System V IPC (issue 17).

Checkpoint bugs fixed:
- sysvipc.check compared a process's semaphore undo list with lcr's own:
  lcr with threads has one (glibc shares it with CLONE_SYSVSEM), so every
  process looked as if it held SEM_UNDO adjustments.
- An ordinary user's checkpoint read every semaphore set of the namespace
  (GETPID): another user's set (mode 0600) raised PermissionError and ended
  in an internal error.  Such a set is skipped unless the tree may use it
  (then a clean NotCheckpointable naming it).

Snapshots: they keep the segments' content, semaphore values and queued
messages; rollback puts them back (makes removed ones again, refused by
name when that cannot be; in an own ipc namespace removes the ones made
since), the guardian too; writeback writes them in the image; migration
of an `lcr run --ipc` tree carries them.
"""
from __future__ import annotations

import os
import random
import subprocess
import json
import signal
import sys
import threading

import pytest

import helpers
from helpers import assert_clean_error, lcr, reap, restart_image, wait_for_line
from rootless_helpers import lcr_as, start_as, user_workdir
from linuxcr.resources import sysvipc
from linuxcr.sys import ipc

pytestmark = pytest.mark.e2e
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="makes root's semaphore sets")


@pytest.fixture
def semset():
    """make(mode) -> semid: semaphore sets in lcr's ipc namespace, removed by id."""
    made = []

    def make(mode: int) -> int:
        sid = ipc.sem_get(random.randrange(0x10000000, 0x3fffffff), 1,
                          ipc.IPC_CREAT | ipc.IPC_EXCL | mode)
        made.append(sid)
        return sid
    yield make
    for sid in made:
        try:
            ipc.sem_rm(sid)
        except OSError:
            pass


def test_undo_check_with_threads_in_lcr(procs, semset, tmp_path):
    """A plain process (no undo list) is not refused although the process
    running the check has threads (and so an undo list)."""
    semset(0o666)
    p = procs.start(["sleep", "1000"], tmp_path / "sleep.log")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert sysvipc.check(p.pid) == []
    finally:
        stop.set()
        t.join()


@root_only
def test_undo_list_still_refused(procs, semset, tmp_path):
    """A process that has an undo list (here: it has a thread) is still refused."""
    semset(0o666)
    p = procs.start(["python3", "-c", "import threading, time; "
                     "threading.Thread(target=time.sleep, args=(1000,)).start(); "
                     "print('READY', flush=True); time.sleep(1000)"], tmp_path / "t.log")
    helpers.wait_for_line(tmp_path / "t.log", r"^READY", pid=p.pid)
    why = sysvipc.check(p.pid)
    assert why and "SEM_UNDO" in why[0]


def _user_sleep(user, wd):
    p = start_as(user, ["sleep", "1000"], wd / "sleep.log", cwd=wd)
    return p


@root_only
def test_other_users_semaphore_skipped(user, wd, trees, semset):
    """root's mode-0600 set: the user's checkpoint skips it (not its own)."""
    semset(0o600)
    p = _user_sleep(user, wd)
    trees.add(p.pid, p)
    cp = lcr_as(user, "checkpoint", p.pid, "-o", wd / "img", check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr


@root_only
def test_other_users_semaphore_usable_refused(user, wd, trees, semset):
    """root's set the user may alter but not read (mode 0602): the tree may
    use it and lcr cannot save it: a clean refusal naming the set."""
    sid = semset(0o602)
    p = _user_sleep(user, wd)
    trees.add(p.pid, p)
    cp = lcr_as(user, "checkpoint", p.pid, "-o", wd / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[f"semaphore set {sid}", "uid 0"])
    assert helpers.alive(p.pid)


# --- snapshots of semaphores and queues ------------------------------------------

WORKLOAD = """
import os, sys, time
from linuxcr.sys import ipc
key = int(sys.argv[1])
sid = ipc.sem_get(key, 3, ipc.IPC_CREAT | ipc.IPC_EXCL | 0o600)
ipc.sem_setall(sid, [1, 2, 3])
qid = ipc.msg_get(key + 1, ipc.IPC_CREAT | ipc.IPC_EXCL | 0o600)
ipc.msg_send(qid, 1, b"one")
ipc.msg_send(qid, 2, b"two")
print(f"READY pid={os.getpid()} sem={sid} msg={qid}", flush=True)
while True:
    time.sleep(1000)
"""


@pytest.fixture
def semq(procs, tmp_path):
    """The workload: (pid, semid, msqid); its two objects removed by id."""
    made = {}
    log = tmp_path / "semq.log"
    p = procs.start([sys.executable, "-c", WORKLOAD, str(random.randrange(0x10000000, 0x3fffffff))],
                    log, env=helpers.child_env({"PYTHONPATH": os.environ.get("PYTHONPATH", "")}))
    m = wait_for_line(log, r"^READY pid=(\d+) sem=(\d+) msg=(\d+)", pid=p.pid)
    made["sem"], made["msg"] = int(m.group(2)), int(m.group(3))
    yield p.pid, made["sem"], made["msg"]
    for rm, oid in ((ipc.sem_rm, made["sem"]), (ipc.msg_rm, made["msg"])):
        try:
            rm(oid)
        except OSError:
            pass


def _state(sid: int, qid: int):
    return ipc.sem_values(sid, 3), ipc.msg_peek(qid, ipc.msg_stat(qid).qnum)


@root_only
def test_snapshot_rollback_writeback(semq, procs, tmp_path, agent_env):
    pid, sid, qid = semq
    before = _state(sid, qid)
    assert before == ([1, 2, 3], [(1, b"one"), (2, b"two")])
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    ipc.sem_setall(sid, [7, 8, 9])
    ipc.msg_drain(qid)
    ipc.msg_send(qid, 5, b"later")
    assert _state(sid, qid) != before
    cp = lcr("rollback", snap["crid"], env=agent_env, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert _state(sid, qid) == before
    assert helpers.alive(pid)
    # writeback: the image holds the snapshot-time objects
    ipc.sem_setall(sid, [4, 4, 4])
    img = tmp_path / "wb.img"
    lcr("writeback", snap["crid"], "-o", img, env=agent_env)
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    ipc.sem_rm(sid)
    ipc.msg_rm(qid)
    new = restart_image(img, procs)
    assert new == pid
    assert _state(sid, qid) == before


@root_only
def test_rollback_makes_removed_again(semq, agent_env):
    """A queue removed since the snapshot is made again with its id."""
    pid, sid, qid = semq
    before = _state(sid, qid)
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    ipc.msg_rm(qid)
    ipc.sem_setall(sid, [5, 5, 5])
    cp = lcr("rollback", snap["crid"], env=agent_env, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert _state(sid, qid) == before
    assert helpers.alive(pid)


@root_only
def test_rollback_refused_when_taken(semq, agent_env):
    """A queue removed since and its key taken by another: refused by name,
    nothing changed."""
    pid, sid, qid = semq
    key = ipc.msg_stat(qid).perm.key
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    ipc.msg_rm(qid)
    other = ipc.msg_get(key, ipc.IPC_CREAT | 0o600)
    try:
        ipc.sem_setall(sid, [5, 5, 5])
        cp = lcr("rollback", snap["crid"], env=agent_env, check=False)
        assert_clean_error(cp, "RollbackRefused", mentions=[f"{qid}", "taken"])
        assert ipc.sem_values(sid, 3) == [5, 5, 5]      # nothing changed
        assert helpers.alive(pid)
    finally:
        ipc.msg_rm(other)


# --- a segment attached (with a semaphore set and a queue): tests/progs/sysv_ipc.c

SYSV = "sysv_ipc"


@pytest.fixture
def sysv_prog(bins, procs, tmp_path):
    key = random.randrange(0x10000000, 0x3fffffff)
    log = tmp_path / "sysv.log"
    p = procs.start([bins[SYSV], str(key)], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
    procs.add(int(m.group(2)))
    yield p.pid, int(m.group(2)), log, key
    for flag, k in (("-M", key), ("-S", key + 1), ("-Q", key + 2)):
        subprocess.run(["ipcrm", flag, str(k)], capture_output=True)


@root_only
@pytest.mark.parametrize("way", ["fast", "full"])
def test_segment_snapshot_rollback(sysv_prog, agent_env, way):
    pid, child, log, key = sysv_prog
    helpers.assert_pass(pid, log, SYSV)
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    shmid = ipc.shm_get(key, 0, 0)
    size = ipc.shm_stat(shmid).segsz
    saved = ipc.shm_read(shmid, size)
    ipc.shm_write(shmid, [(0, b"\xff" * size)])
    cp = lcr("rollback", snap["crid"], *(["--full"] if way == "full" else []), env=agent_env,
             check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert ipc.shm_read(shmid, size) == saved
    helpers.assert_pass(pid, log, SYSV)
    helpers.assert_pass(child, log, SYSV)


def _sysv_lines(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [ln.split()[0] for ln in f if "/SYSV" in ln]


@root_only
def test_segment_rollback_keeps_attaches(sysv_prog, agent_env):
    pid, child, log, key = sysv_prog
    before = _sysv_lines(pid)
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    lcr("rollback", snap["crid"], "--full", env=agent_env)
    assert _sysv_lines(pid) == before


@root_only
def test_segment_writeback_restart(sysv_prog, procs, tmp_path, agent_env):
    pid, child, log, key = sysv_prog
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    shmid = ipc.shm_get(key, 0, 0)
    size = ipc.shm_stat(shmid).segsz
    saved = ipc.shm_read(shmid, size)
    ipc.shm_write(shmid, [(0, b"\xff" * size)])         # after the snapshot: not in the image
    img = tmp_path / "wb.img"
    cp = lcr("writeback", snap["crid"], "-o", img, env=agent_env, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    lcr("discard", snap["crid"], env=agent_env)
    for p in (child, pid):
        os.kill(p, signal.SIGKILL)
        reap(p)
    for flag, k in (("-M", key), ("-S", key + 1), ("-Q", key + 2)):
        subprocess.run(["ipcrm", flag, str(k)], capture_output=True)
    assert restart_image(img, procs) == pid
    procs.add(child)
    shmid = ipc.shm_get(key, 0, 0)
    assert ipc.shm_read(shmid, size) == saved
    helpers.assert_pass(pid, log, SYSV)
    helpers.assert_pass(child, log, SYSV)


@root_only
def test_migrate_lcr_run_ipc(bins, procs, tmp_path):
    """A tree in ipc and pid namespaces of its own (`lcr run --ipc`) with a
    segment attached, a semaphore set and a queue moves over loopback (both
    ends in this network namespace: the tree's namespaces keep the ids from
    clashing): the final round carries the IPC record, the receiver makes
    the objects in a new ipc namespace."""
    from test_migrate import LCR_MIG, TOKEN, _env
    key = random.randrange(0x10000000, 0x3fffffff)
    log = tmp_path / "sysv.log"
    root = procs.add(int(lcr("run", "--ipc", "-o", log, "--", bins[SYSV], key).stdout))
    wait_for_line(log, r"^READY pid=2 child=\d+")
    word = helpers.pass_field(helpers.assert_pass(root, log, SYSV), "word")
    port = random.randrange(20000, 30000)
    out, err = tmp_path / "recv.out", tmp_path / "recv.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        recv = subprocess.Popen([*LCR_MIG, "receive", "--listen", f"127.0.0.1:{port}", "--token",
                                 TOKEN, "--timeout", "60s"], stdin=subprocess.DEVNULL, stdout=o,
                                stderr=e, env=_env(), close_fds=True, start_new_session=True)
    procs.add(recv.pid)
    wait_for_line(err, r"listening on", pid=recv.pid)
    cp = subprocess.run([*LCR_MIG, "migrate", str(root), "--to", f"127.0.0.1:{port}", "--token",
                         TOKEN], capture_output=True, text=True, env=_env(verbose=False),
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert recv.wait() == 0, err.read_text()
    new = procs.add(int(out.read_text()))
    reap(root)
    m = helpers.assert_pass(new, log, SYSV)
    assert helpers.pass_field(m, "word") > word
    assert os.stat(f"/proc/{new}/ns/ipc").st_ino != os.stat("/proc/self/ns/ipc").st_ino


@root_only
def test_rootless_snapshot_rollback_writeback(user, wd, trees):
    """lcrtest's own semaphore set and queue: its agent snapshots, rolls
    back and writes back."""
    from rootless_helpers import LCR
    log = wd / "semq.log"
    p = start_as(user, [sys.executable, "-c", WORKLOAD, str(random.randrange(0x10000000, 0x3fffffff))],
                 log, cwd=wd)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) sem=(\d+) msg=(\d+)", pid=p.pid)
    sid, qid = int(m.group(2)), int(m.group(3))
    agent = wd / "agent"
    env = user.env({"LCR_AGENT_DIR": str(agent)})

    def run(*args):
        cp = subprocess.run([*user.prefix, *LCR, *map(str, args)], capture_output=True, text=True,
                            env=env, cwd=wd, timeout=120)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, (args, cp.stderr)
        return cp.stdout
    try:
        before = _state(sid, qid)
        crid = json.loads(run("snapshot", p.pid, "--json"))["crid"]
        ipc.sem_setall(sid, [9, 9, 9])
        ipc.msg_send(qid, 3, b"three")
        run("rollback", crid)
        assert _state(sid, qid) == before
        run("writeback", crid, "-o", wd / "wb.img")
        assert (wd / "wb.img").stat().st_size > 0
    finally:
        try:
            os.kill(int((agent / "agent.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        for rm, oid in ((ipc.sem_rm, sid), (ipc.msg_rm, qid)):
            try:
                rm(oid)
            except OSError:
                pass


@root_only
def test_own_ipc_namespace_rollback(bins, procs, tmp_path, agent_env):
    """`lcr run --ipc`: the snapshot keeps every object of the tree's ipc
    namespace; rollback puts the segment back and removes a queue made
    there since."""
    key = random.randrange(0x10000000, 0x3fffffff)
    log = tmp_path / "sysv.log"
    root = procs.add(int(lcr("run", "--ipc", "-o", log, "--", bins[SYSV], key).stdout))
    wait_for_line(log, r"^READY pid=2 child=\d+")
    helpers.assert_pass(root, log, SYSV)
    snap = json.loads(lcr("snapshot", root, "--json", env=agent_env).stdout)
    inside = ["nsenter", "-t", str(root), "-i"]
    made = subprocess.run([*inside, "ipcmk", "-Q"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert len(subprocess.run([*inside, "ipcs", "-q"], capture_output=True,
                              text=True).stdout.split("\n0x")) == 3    # the program's + the new
    cp = lcr("rollback", snap["crid"], env=agent_env, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    queues = subprocess.run([*inside, "ipcs", "-q"], capture_output=True, text=True).stdout
    assert len(queues.split("\n0x")) == 2, queues
    helpers.assert_pass(root, log, SYSV)


@root_only
def test_guardian_completes_ipc(semq, agent_env):
    """The agent killed once the rollback has begun: its guardian finishes
    it, the semaphore values and queued messages too."""
    from test_agentsafe import _killed_run
    from test_faults import wait_running
    pid, sid, qid = semq
    before = _state(sid, qid)
    snap = json.loads(lcr("snapshot", pid, "--json", env=agent_env).stdout)
    ipc.sem_setall(sid, [6, 6, 6])
    ipc.msg_send(qid, 4, b"four")
    _killed_run(agent_env, "rollback.begun", "rollback", snap["crid"], "--full")
    wait_running(pid)
    assert _state(sid, qid) == before
