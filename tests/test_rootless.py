"""End to end without root: lcr run by an ordinary user (``lcrtest``) on
that user's own processes.

The test process itself is root (it starts, probes and kills processes of
any user); every lcr command and every checkpointed program runs as
``lcrtest`` (setpriv: it execs, so the pid we start is the program's pid).
Skipped when there is no such user (.ci/run creates it) or when it cannot
use this interpreter.

- memhog, pyhog, a Python program, two processes joined by pipes and
  sharing a file: checkpoint and restart as lcrtest.  The restart lands in
  a new user+pid namespace (lcr-init as its pid 1): the program still sees
  its saved pid (getpid()), the caller sees the pid `lcr restart` printed;
- an `lcr run` tree (a shell pipeline) checkpointed and restarted as
  lcrtest: every pid inside the namespace comes back, the stream goes on;
- lcrtest may not checkpoint a process of root or of another user (nobody),
  nor restore an image root made of a root process.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

import helpers
from helpers import (PROGS_DIR, assert_clean_error, assert_pass, assert_running_untraced,
                     pass_field, probe_hog, reap, shared_dir, start_prog, wait_for_line)
from rootless_helpers import (Trees, User, assert_tree_running_untraced, check_sequence,
                              count_lines, descendants, exe_of, find_by_exe, find_user,
                              inner_pid, lcr_as, nspid, start_as, tree_pids, user_can_run_lcr,
                              user_workdir, wait_until)

pytestmark = pytest.mark.e2e








def _uid(pid: int) -> int:
    return int(helpers.proc_status(pid)["Uid"].split()[0])


def _our_children_of(uid: int) -> set[int]:
    """Our children (any state) running as uid: whatever an lcr we ran
    left behind comes to us (a child subreaper)."""
    out = set()
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = helpers.proc_status(int(d))
            if st and st["PPid"] == me and int(st["Uid"].split()[0]) == uid:
                out.add(int(d))
    return out


def _checkpoint_as(user, pids: list[int], img: Path) -> None:
    """Checkpoint (kills the tree) as the user; wait until every process of
    the tree is gone."""
    lcr_as(user, "checkpoint", pids[0], "-o", img)
    for p in reversed(pids):
        reap(p)


def _restart_as(user, img: Path, trees: Trees) -> tuple[int, str]:
    """``lcr restart`` as the user: the pid it prints (as seen from here).
    The restored root and, if any, the lcr-init above it are registered for
    teardown before anything is checked."""
    cp = lcr_as(user, "restart", img, check=False)
    pid = None
    if cp.returncode == 0 and re.fullmatch(r"\d+\n?", cp.stdout):
        pid = int(cp.stdout)
        init = _ns_init_above(pid)
        if init:
            trees.add(init)          # killed last (exits by itself when its child dies)
        trees.add(pid)
    assert cp.returncode == 0, f"lcr restart {img} (as {user.name}) exited {cp.returncode}:\n{cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    assert pid is not None, f"lcr restart should print one pid, printed {cp.stdout!r}"
    return pid, cp.stderr


def _ns_init_above(pid: int) -> int | None:
    """The parent of pid if it is the init (pid 1) of a pid namespace below
    ours: the lcr-init of a rootless restart."""
    st = helpers.proc_status(pid)
    ppid = int(st["PPid"]) if st else 0
    if ppid <= 1 or ppid == os.getpid() or helpers.proc_status(ppid) is None:
        return None
    ns = nspid(ppid)
    return ppid if len(ns) >= 2 and ns[-1] == 1 else None


def _assert_ns_restore(new: int, original: int, err: str, user: User, expect_init: bool = True):
    """Restored into a new pid namespace: seen here as ``new``, sees itself
    as ``original``, owned by the user, under an lcr-init (pid 1 there)."""
    ns = nspid(new)
    assert ns[0] == new and ns[-1] == original and len(ns) >= 2, \
        f"NSpid of the restored process: {ns}, want [{new}, ..., {original}]"
    assert "namespace" in err, f"no note about the new pid namespace on stderr: {err!r}"
    assert str(original) in err and str(new) in err, err
    assert _uid(new) == user.uid
    if expect_init:
        init = _ns_init_above(new)
        assert init is not None, f"the restored process's parent is no namespace init: " \
                                 f"{helpers.proc_status(new)['PPid']}"
        assert _uid(init) == user.uid
        assert helpers.proc_state(init) in ("S", "R"), helpers.proc_status(init)["State"]


# --------------------------------------------------------------------------
# memhog, pyhog, getpid

@pytest.mark.parametrize("which", ["memhog", "pyhog"])
def test_hog_as_user(which, user, wd, bins, trees):
    log = wd / f"{which}.log"
    if which == "memhog":
        argv = [bins["memhog"], "-f", "64"]
    else:
        pyhog = shared_dir() / "workloads" / "pyhog.py"
        if not pyhog.exists():
            pytest.skip(f"{pyhog} not found (set LCR_SHARED)")
        argv = [sys.executable, pyhog, "-f", "64"]
    p = start_as(user, argv, log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^pid={p.pid} ready\b", helpers.READY_TIMEOUT, pid=p.pid)
    assert _uid(p.pid) == user.uid
    a = probe_hog(p.pid, log)
    assert a.ok, a.line

    _checkpoint_as(user, [p.pid], wd / "img")
    new, err = _restart_as(user, wd / "img", trees)
    _assert_ns_restore(new, p.pid, err, user)
    assert_running_untraced(new)
    b = probe_hog(new, log)
    assert b.ok, f"after restore: {b.line}"
    assert b.counter > a.counter
    assert re.search(rf"\bpid={p.pid}\b", b.line), f"the restored hog sees another pid: {b.line}"


def test_getpid_as_user(user, wd, bins, trees):
    log = wd / "getpid.log"
    p = start_as(user, [bins["tree_getpid"]], log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^READY pid={p.pid}\b", helpers.READY_TIMEOUT, pid=p.pid)
    m = assert_pass(p.pid, log, "tree_getpid")
    assert pass_field(m, "getpid") == p.pid

    _checkpoint_as(user, [p.pid], wd / "img")
    new, err = _restart_as(user, wd / "img", trees)
    _assert_ns_restore(new, p.pid, err, user)
    m = assert_pass(new, log, "tree_getpid")          # signalled at the pid lcr printed
    assert pass_field(m, "getpid") == p.pid, m.string
    assert pass_field(m, "gettid") == p.pid, m.string
    assert pass_field(m, "probes") == 2
    # checkpointed again from its new place, by the same user
    pids = [new]
    init = int(helpers.proc_status(new)["PPid"])
    _checkpoint_as(user, pids, wd / "img2")
    reap(init)
    new2, err = _restart_as(user, wd / "img2", trees)
    _assert_ns_restore(new2, p.pid, err, user)
    assert pass_field(assert_pass(new2, log, "tree_getpid"), "getpid") == p.pid


def test_lcr_init_is_named(user, wd, bins, trees):
    """The namespace init of a rootless restart is named lcr-init."""
    log = wd / "getpid.log"
    p = start_as(user, [bins["tree_getpid"]], log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^READY pid={p.pid}\b", helpers.READY_TIMEOUT, pid=p.pid)
    _checkpoint_as(user, [p.pid], wd / "img")
    new, _ = _restart_as(user, wd / "img", trees)
    init = _ns_init_above(new)
    assert init is not None
    assert helpers.proc_status(init)["Name"] == "lcr-init"


# --------------------------------------------------------------------------
# a Python program; two processes, pipes and a shared file

def test_python_as_user(user, wd, trees):
    log = wd / "pycount.log"
    p = start_as(user, [sys.executable, PROGS_DIR / "pycount.py", wd / "pycount.txt"], log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^READY pid={p.pid}\b", helpers.READY_TIMEOUT, pid=p.pid)
    before = pass_field(assert_pass(p.pid, log, "pycount"), "count")
    _checkpoint_as(user, [p.pid], wd / "img")
    new, err = _restart_as(user, wd / "img", trees)
    _assert_ns_restore(new, p.pid, err, user)
    m = assert_pass(new, log, "pycount")
    assert pass_field(m, "count") > before
    assert pass_field(m, "pid") == p.pid      # the pid it sees


def test_pipe_and_file_as_user(user, wd, bins, trees):
    log = wd / "pipefile.log"
    p = start_as(user, [bins["tree_pipefile"], wd / "numbers.txt"], log, cwd=wd)
    trees.add(p.pid, p)
    m = wait_for_line(log, rf"^READY pid={p.pid} child=(\d+)", helpers.READY_TIMEOUT, pid=p.pid)
    child = int(m.group(1))
    sent = pass_field(assert_pass(p.pid, log, "tree_pipefile"), "sent")

    _checkpoint_as(user, [p.pid, child], wd / "img")
    new, err = _restart_as(user, wd / "img", trees)
    _assert_ns_restore(new, p.pid, err, user)
    kids = descendants(new)
    assert len(kids) == 1 and inner_pid(kids[0]) == child, \
        f"restored child: {[(k, nspid(k)) for k in kids]}, want inner pid {child}"
    assert_tree_running_untraced(new)
    m = assert_pass(new, log, "tree_pipefile")
    assert pass_field(m, "sent") > sent
    assert pass_field(m, "child") == child


# --------------------------------------------------------------------------
# an `lcr run` tree as the user

def test_lcr_run_pipeline_as_user(user, wd, bins, trees):
    out = wd / "out.txt"
    log = wd / "run.log"
    cmd = f"{bins['tree_producer']} 500 | tr a-z A-Z | cat >> {out}"
    root = int(lcr_as(user, "run", "-o", log, "-C", wd, "--", "sh", "-c", cmd).stdout)
    trees.add(root)
    assert inner_pid(root) == 1 and _uid(root) == user.uid
    wait_until(lambda: len(descendants(root)) == 4, 30, "lcr run's init, sh, the 3 pipeline processes")
    wait_until(lambda: count_lines(out) >= 300, 60, f"300 lines in {out}")
    pids = tree_pids(root)
    inner_before = {exe_of(p): inner_pid(p) for p in pids}

    _checkpoint_as(user, pids, wd / "img")
    at_ckpt = count_lines(out)
    new, err = _restart_as(user, wd / "img", trees)
    assert "namespace" in err, err
    assert inner_pid(new) == 1 and _uid(new) == user.uid
    pids = tree_pids(new)
    assert len(pids) == 5, pids
    assert {exe_of(p): inner_pid(p) for p in pids} == inner_before, "pids inside the namespace changed"
    assert_tree_running_untraced(new)

    wait_until(lambda: count_lines(out) >= at_ckpt + 500, 60,
               f"the pipeline to go on past line {at_ckpt}")
    os.kill(find_by_exe(descendants(new), bins["tree_producer"]), signal.SIGTERM)
    reap(new, 60)
    n = check_sequence(out, "LINE %d")
    assert n >= at_ckpt + 500


# --------------------------------------------------------------------------
# what the user may not do

def _start_counter_as(uid_gid: tuple[int, int] | None, procs, bins, tmp_path):
    prefix = [] if uid_gid is None else \
        ["setpriv", f"--reuid={uid_gid[0]}", f"--regid={uid_gid[1]}", "--clear-groups"]
    return start_prog(procs, "counter", bins, tmp_path, prefix=prefix)


@pytest.mark.parametrize("owner", ["root", "nobody"])
def test_cannot_checkpoint_others(owner, user, wd, bins, procs, tmp_path):
    if owner == "root":
        ids, uid = None, 0
    else:
        import pwd
        try:
            pw = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user nobody")
        ids, uid = (pw.pw_uid, pw.pw_gid), pw.pw_uid
    r = _start_counter_as(ids, procs, bins, tmp_path)
    assert _uid(r.pid) == uid
    img = wd / "img"
    for args in (["checkpoint", r.pid, "-o", img], ["checkpoint", r.pid, "-o", img, "--leave-running"],
                 ["check", r.pid]):
        cp = lcr_as(user, *args, check=False)
        line = assert_clean_error(cp, "PermissionDenied", mentions=[str(r.pid)])
        assert re.search(rf"\buid {uid}\b|\b{owner}\b", line), \
            f"the error does not name the owner (uid {uid}): {line!r}"
        assert_running_untraced(r.pid)
        assert not img.exists() and not list(wd.glob("img*")), "an image was left behind"
    r.assert_pass()


def test_cannot_restore_root_image(user, wd, bins, procs, tmp_path):
    r = start_prog(procs, "counter", bins, tmp_path)
    r.assert_pass()
    img = wd / "root.img"
    helpers.lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    assert img.stat().st_uid == 0
    before = _our_children_of(user.uid)

    # as written (mode 600): the user cannot even read it
    cp = lcr_as(user, "restart", img, check=False)
    assert_clean_error(cp, mentions=[str(img)], empty_stdout=True)
    # readable: refused for what it holds, a process of another user
    os.chmod(img, 0o644)
    cp = lcr_as(user, "restart", img, check=False)
    line = assert_clean_error(cp, "RestoreError", mentions=["uid 0"], empty_stdout=True)
    assert "root" in line or "another user" in line, line
    cp = lcr_as(user, "restart", img, "--any-pid", check=False)
    assert_clean_error(cp, "PermissionDenied", mentions=["--any-pid", "without --any-pid"],
                       empty_stdout=True)

    assert not helpers.exists(r.pid), f"pid {r.pid} exists again"
    assert not helpers.pids_with_exe(bins["counter"]), "a counter process was created"
    left = _our_children_of(user.uid) - before
    assert not left, f"processes of {user.name} were left behind: {left}"


def test_migrate_as_user(user, wd, bins, trees):
    """`lcr migrate` / `lcr receive` as an ordinary user, over loopback: the
    destination restores in a user+pid namespace of its own, the files reach
    the tasks through SCM_RIGHTS (pidfd_getfd would need ptrace rights over
    lcr from inside that namespace)."""
    import socket as _s
    import subprocess
    log = wd / "memhog.log"
    p = start_as(user, [bins["memhog"], "-f", "-s", "2000", "32"], log, cwd=wd)
    trees.add(p.pid, p)
    wait_for_line(log, rf"^pid={p.pid} ready\b", helpers.READY_TIMEOUT, pid=p.pid)
    a = probe_hog(p.pid, log)
    with _s.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, err = wd / "recv.out", wd / "recv.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        recv = subprocess.Popen([*user.prefix, *helpers.LCR, "receive", "--listen",
                                 f"127.0.0.1:{port}", "--token", "user-token-1234", "--timeout", "120s"],
                                stdin=subprocess.DEVNULL, stdout=o, stderr=e, cwd=helpers.REPO,
                                env=user.env({"LCR_VERBOSE": "1"}), start_new_session=True)
    trees.add(recv.pid, recv)
    wait_for_line(err, "listening on", pid=recv.pid)
    cp = lcr_as(user, "migrate", p.pid, "--to", f"127.0.0.1:{port}", "--token", "user-token-1234")
    assert recv.wait(120) == 0, err.read_text()
    new = int(out.read_text().strip())
    trees.add(new)
    assert "downtime" in cp.stdout, cp.stdout
    helpers.reap(p.pid)
    assert _uid(new) == user.uid
    b = probe_hog(new, log)
    assert b.ok and b.counter > a.counter, b.line
    assert re.search(rf"\bpid={p.pid}\b", b.line), b.line     # its own pid, in its namespace
