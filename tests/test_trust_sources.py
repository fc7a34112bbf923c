"""Trust is decided by who could have written the bytes (image/source.py),
and -o never writes through what another user controls (image/files.py).

Reading: an ordinary user (lcrtest) checkpoints their own process, forges
root's credentials and every capability into the image (checksums and
trailer digest recomputed, as test_trust's forger does), and serves it to
root's `lcr restart` through every way an image can arrive: a file of
theirs, their symlink to a root-owned copy, their FIFO, a pipe they write
(stdin), a UNIX socket they hold the other end of (stdin), and as a parent
found in --images-dir.  Each is refused with one PermissionDenied line
naming the way out; with --trust it restores (as root: that is what --trust
means).  Root's own pipe and file restore without --trust.

Writing: root's `lcr checkpoint -o PATH` where lcrtest planted PATH in /tmp
(world-writable, sticky) or in a world-writable directory without the
sticky bit: a symlink to a root file, a symlink to their FIFO, their FIFO,
their file, a new name in the open directory: each refused before the
process is touched, nothing written; root's own links, /dev/null and
/dev/stdout still work.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import msgspec
import pytest

import helpers
from helpers import (LCR, assert_clean_error, exists, kill_and_reap, lcr, parse_restored_pid,
                     reap)
from linuxcr.image.schema import Creds, RecType, Task
from test_trust import (_lcr_user, _refused, edit_meta, privdrop, records_of,  # noqa: F401
                        reframe, start_privdrop, user, world)

pytestmark = pytest.mark.e2e
ALL_CAPS = int(helpers.proc_status(os.getpid())["CapPrm"], 16)     # all root has here


def forge_root(data: bytes) -> bytes:
    """The image with its (first) task made root with every capability."""
    recs = records_of(data)
    task = next(msgspec.msgpack.decode(m, type=Task) for t, m, _ in recs if t == RecType.TASK)
    caps = [ALL_CAPS, ALL_CAPS, ALL_CAPS, ALL_CAPS, 0][:max(len(task.caps), 3)]
    return reframe(edit_meta(recs, RecType.TASK, Task, caps=caps,
                             creds=Creds(uid=[0] * 4, gid=[0] * 4, groups=[])))


@pytest.fixture
def forged(privdrop, procs, world, user):
    """lcrtest's own process, checkpointed by lcrtest, forged into root:
    (path of the forged image owned by lcrtest, the original pid)."""
    os.chown(world, user.uid, user.gid)
    r = start_privdrop(procs, privdrop["plain"], world, user.uid, prefix=user.prefix)
    img = world / "own.img"
    cp = _lcr_user(user, "checkpoint", r.pid, "-o", img)
    assert cp.returncode == 0, cp.stderr
    reap(r.pid)
    bad = world / "forged.img"
    bad.write_bytes(forge_root(img.read_bytes()))
    os.chown(bad, user.uid, user.gid)
    assert lcr("show", bad).returncode == 0        # every integrity check passes
    return bad, r.pid


def _restored_root(procs, cp) -> int:
    assert cp.returncode == 0, cp.stderr
    pid = procs.add(parse_restored_pid(cp.stdout))
    assert helpers.proc_status(pid)["Uid"].split() == ["0"] * 4
    return pid


def start_root(procs, privdrop, world: Path) -> helpers.Running:
    """privdrop as root (it stays root: its own probe would say FAIL)."""
    log = world / f"root-{len(list(world.iterdir()))}.log"
    p = procs.start([privdrop["plain"], "0"], log, cwd=world)
    helpers.wait_for_line(log, r"^READY pid=(\d+)", pid=p.pid)
    return helpers.Running(p.pid, log, None, p)


def _as(user, *argv) -> list[str]:
    return [*user.prefix, *map(str, argv)]


def test_forged_file_of_theirs(forged, procs):
    bad, pid = forged
    _refused(lcr("restart", bad, check=False), "uid 0", "owned by uid", hint="uid,caps")
    assert not exists(pid)
    _restored_root(procs, lcr("restart", bad, "--trust", "uid,caps", check=False))


def test_forged_through_their_symlink(forged, procs, user):
    """A root-owned copy, reached through a symlink lcrtest planted in /tmp."""
    bad, pid = forged
    d = Path(tempfile.mkdtemp(prefix="lcr-rootcopy-"))
    link = Path(tempfile.mktemp(prefix="lcr-link-", dir="/tmp"))
    try:
        copy = d / "img"
        shutil.copy(bad, copy)
        os.chown(copy, 0, 0)
        subprocess.run(_as(user, "ln", "-s", copy, link), check=True)
        _refused(lcr("restart", link, check=False), "symlink", str(link), hint="uid,caps")
        assert not exists(pid)
        # root's own copy, by its own path: root's
        _restored_root(procs, lcr("restart", copy, check=False))
    finally:
        link.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


def test_forged_through_their_fifo(forged, procs, user, world):
    bad, pid = forged
    fifo = world / "fifo"
    for trust in ((), ("--trust", "uid,caps")):
        fifo.unlink(missing_ok=True)
        subprocess.run(_as(user, "mkfifo", "-m", "644", fifo), check=True)
        feeder = subprocess.Popen(_as(user, "sh", "-c", f"cat {bad} > {fifo}"))
        try:
            cp = lcr("restart", fifo, *trust, check=False)
        finally:
            feeder.kill()
            feeder.wait()
        if not trust:
            _refused(cp, "fifo", f"uid {user.uid}", hint="uid,caps")
            assert not exists(pid)
        else:
            _restored_root(procs, cp)


def test_forged_through_a_pipe_they_write(forged, procs, user):
    bad, pid = forged
    for trust in ((), ("--trust", "uid,caps")):
        feeder = subprocess.Popen(_as(user, "cat", bad), stdout=subprocess.PIPE)
        try:
            cp = subprocess.run([*LCR, "restart", "-", *trust], stdin=feeder.stdout,
                                capture_output=True, text=True, env=helpers.child_env(),
                                cwd=helpers.REPO, timeout=helpers.LCR_TIMEOUT)
        finally:
            feeder.stdout.close()
            feeder.kill()
            feeder.wait()
        if not trust:
            _refused(cp, "pipe", "uid 0", f"uid {user.uid}", hint="uid,caps")
            assert not exists(pid)
        else:
            _restored_root(procs, cp)


def test_forged_through_a_socket_they_hold(forged, procs, user):
    """stdin is a UNIX socket whose other end lcrtest's cat writes."""
    bad, pid = forged
    ours, theirs = socket.socketpair()
    # (the writer stays: the whole image fits in the socket's buffer)
    feeder = subprocess.Popen(_as(user, "sh", "-c", f"cat {bad}; exec sleep 600"), stdout=theirs)
    theirs.close()
    try:
        cp = subprocess.run([*LCR, "restart", "-"], stdin=ours, capture_output=True, text=True,
                            env=helpers.child_env(), cwd=helpers.REPO, timeout=helpers.LCR_TIMEOUT)
    finally:
        ours.close()
        feeder.kill()
        feeder.wait()
    _refused(cp, "socket", f"uid {user.uid}", hint="uid,caps")
    assert not exists(pid)


def test_root_pipe_and_file_are_roots(privdrop, procs, world):
    """Root's image through root's own pipe (the writer is found: root) or
    file needs nothing."""
    r = start_root(procs, privdrop, world)
    img = world / "img"
    lcr("checkpoint", r.pid, "--leave-running", "-o", img)
    data = img.read_bytes()
    assert len(data) > 1 << 16      # the writer (us) still holds the pipe when lcr looks
    kill_and_reap(r.pid)
    cp = subprocess.run([*LCR, "restart", "-"], input=data, capture_output=True,
                        env=helpers.child_env(), cwd=helpers.REPO, timeout=helpers.LCR_TIMEOUT)
    assert cp.returncode == 0, cp.stderr
    pid = procs.add(int(cp.stdout.split()[-1]))
    kill_and_reap(pid)
    procs.add(parse_restored_pid(lcr("restart", img).stdout))


def test_untrusted_parent_in_images_dir(privdrop, procs, world, user):
    """Root's own incremental image, whose parent is found in a directory of
    lcrtest's: the chain is as trusted as that parent."""
    r = start_root(procs, privdrop, world)
    full, inc = world / "full.img", world / "inc.img"
    lcr("checkpoint", r.pid, "--leave-running", "-o", full)
    lcr("checkpoint", r.pid, "--parent", full, "-o", inc)
    reap(r.pid)
    theirs = world / "theirs"
    theirs.mkdir()
    os.chown(theirs, user.uid, user.gid)
    shutil.copy(full, theirs / "full.img")
    os.chown(theirs / "full.img", user.uid, user.gid)
    _refused(lcr("restart", inc, "--images-dir", theirs, check=False), "full.img", "uid 1001",
             hint="uid,caps")
    assert not exists(r.pid)
    pid = procs.add(parse_restored_pid(lcr("restart", inc, "--images-dir", theirs,
                                           "--trust", "uid,caps").stdout))
    kill_and_reap(pid)
    procs.add(parse_restored_pid(lcr("restart", inc).stdout))     # beside it: root's


def test_ordinary_user_gains_nothing_from_a_forgery(forged, user):
    """Whatever the source, an ordinary user's restart never grants more
    than the user has: root's credentials are refused."""
    bad, pid = forged
    cp = _lcr_user(user, "restart", bad)
    assert_clean_error(cp, "RestoreError", mentions=["uid 0", "only root"], empty_stdout=True)
    assert not exists(pid)


# ==========================================================================
# writing: -o never goes through what another user controls

@pytest.fixture
def victim(privdrop, procs, world):
    r = start_root(procs, privdrop, world)
    yield r
    kill_and_reap(r.pid)


@pytest.fixture
def planted(user):
    """Names lcrtest plants things at: in /tmp (sticky) and in a
    world-writable directory without the sticky bit."""
    made: list[Path] = []
    opendir = Path(tempfile.mkdtemp(prefix="lcr-open-"))
    os.chown(opendir, user.uid, user.gid)
    os.chmod(opendir, 0o777)

    def name(where: str = "/tmp") -> Path:
        p = Path(tempfile.mktemp(prefix="lcr-planted-", dir=where))
        made.append(p)
        return p
    yield name, opendir
    for p in made:
        if p.is_symlink() or p.exists():
            p.unlink()
    shutil.rmtree(opendir, ignore_errors=True)


def _refused_write(cp, *mentions) -> str:
    return assert_clean_error(cp, "ImageWriteError", mentions=["refusing", *mentions],
                              empty_stdout=True)


def test_write_through_their_symlink_to_a_root_file(victim, planted, user, world):
    name, _ = planted
    target = world / "precious"
    target.write_bytes(b"root's data\n")
    link = name()
    subprocess.run(_as(user, "ln", "-s", target, link), check=True)
    _refused_write(lcr("checkpoint", victim.pid, "-o", link, check=False), "symlink", "uid 1001")
    assert target.read_bytes() == b"root's data\n" and exists(victim.pid)


def test_write_through_their_symlink_to_their_fifo(victim, planted, user):
    name, _ = planted
    fifo, link = name(), name()
    subprocess.run(_as(user, "mkfifo", "-m", "666", fifo), check=True)
    subprocess.run(_as(user, "ln", "-s", fifo, link), check=True)
    _refused_write(lcr("checkpoint", victim.pid, "-o", link, check=False), "symlink")
    _refused_write(lcr("checkpoint", victim.pid, "-o", fifo, check=False), "fifo", "uid 1001")
    assert exists(victim.pid)


def test_write_over_their_file_in_sticky_tmp(victim, planted, user):
    name, _ = planted
    f = name()
    subprocess.run(_as(user, "sh", "-c", f"echo theirs > {f}"), check=True)
    _refused_write(lcr("checkpoint", victim.pid, "-o", f, check=False), "uid 1001", "sticky")
    assert f.read_text() == "theirs\n" and exists(victim.pid)


def test_write_into_an_open_directory(victim, planted, user, world):
    """A world-writable directory without the sticky bit: a new name, and
    a symlink lcrtest planted there (to a root file)."""
    _, opendir = planted
    _refused_write(lcr("checkpoint", victim.pid, "-o", opendir / "img", check=False),
                   "sticky bit", str(opendir))
    assert not list(opendir.iterdir()) and exists(victim.pid)
    target = world / "precious"
    target.write_bytes(b"root's data\n")
    subprocess.run(_as(user, "ln", "-s", target, opendir / "link"), check=True)
    _refused_write(lcr("checkpoint", victim.pid, "-o", opendir / "link", check=False), "symlink")
    assert target.read_bytes() == b"root's data\n" and exists(victim.pid)


def test_write_where_it_should(victim, world):
    """Root's own link, /dev/null and /dev/stdout (a pipe) still work."""
    img, link = world / "img", world / "link"
    os.symlink(img, link)
    lcr("checkpoint", victim.pid, "--leave-running", "-o", link)
    assert link.is_symlink() and img.stat().st_size > 0
    lcr("checkpoint", victim.pid, "--leave-running", "-o", "/dev/null")
    cp = lcr("checkpoint", victim.pid, "--leave-running", "-o", "/dev/stdout", binary=True)
    assert cp.stdout[:8] == img.read_bytes()[:8]
    assert exists(victim.pid)


def test_low_downtime_of_another_users_process(victim, user):
    cp = _lcr_user(user, "checkpoint", "--low-downtime", victim.pid, "-o", "/tmp/lcr-never.img")
    assert_clean_error(cp, "PermissionDenied", mentions=["permission denied", str(victim.pid),
                                                         "uid 0"], empty_stdout=True)
    assert exists(victim.pid) and not os.path.exists("/tmp/lcr-never.img")


# ==========================================================================
# image/source.py itself: what makes a root-owned file someone else's

@pytest.mark.parametrize("case", ["own", "mode-666", "open-dir", "sticky-dir", "acl", "device",
                                  "their-dir"])
def test_who_could_have_written(case, world, user):
    from linuxcr.image.source import source_of
    d = world / "d"
    d.mkdir()
    f = d / "img"
    f.write_bytes(b"x")
    os.chmod(f, 0o644)
    path = str(f)
    if case == "mode-666":
        os.chmod(f, 0o666)
    elif case == "open-dir":
        os.chmod(d, 0o777)
    elif case == "sticky-dir":
        os.chmod(d, 0o1777)
    elif case == "their-dir":
        os.chown(d, user.uid, user.gid)
    elif case == "acl":
        import struct      # setfacl -m u:lcrtest:rw, as the xattr the kernel keeps
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
                                             [(1, 6, 0xFFFFFFFF), (2, 6, user.uid), (4, 4, 0xFFFFFFFF),
                                              (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])
        try:
            os.setxattr(f, "system.posix_acl_access", acl)
        except OSError as e:
            pytest.skip(f"no POSIX ACLs here: {e}")
    elif case == "device":
        path = "/dev/null"            # root's, but everyone may write it
    fd = os.open(path, os.O_RDONLY)
    try:
        src = source_of(fd, path, path)
    finally:
        os.close(fd)
    trusted = case in ("own", "sticky-dir")
    assert src.trusted_by(0) == trusted, src
    if not trusted:
        why = " ".join(w for _, w in src.writers)
        assert {"mode-666": "everyone", "open-dir": "no sticky bit", "acl": f"uid {user.uid} (ACL)",
                "device": "everyone", "their-dir": f"uid {user.uid}"}[case] in why, why
