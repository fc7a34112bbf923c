"""Creating the blank task a restore rebuilds: where it lives, which pid.

A blank task is a fork of lcr blocked in read() on a pipe whose write end
lcr holds: lcr seizes it and replaces everything in it.  If lcr dies first,
read() sees EOF and the blank exits.

Three places it can be made:
- the host pid namespace, at the saved pid (clone3 set_tid; root), or at
  any pid;
- a fresh pid namespace (plus a user namespace when not root) where the
  blank is pid 1: for images of a namespace's init (`lcr run` trees);
- a fresh pid namespace (plus user namespace) with a small init of ours as
  pid 1 and the blank at the saved pid: how an ordinary user gets the saved
  pid back, since only root may choose pids in the host namespace.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import sys
from dataclasses import dataclass

from linuxcr.engine import run_init
from linuxcr.errors import KernelError, PidTaken, RestoreError
from linuxcr.sys.ipc import setns
from linuxcr.sys.nshelper import loopback_up
from linuxcr.sys.syscalls import clone3_stopped_child, close_all_but, libc, prctl

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNS, CLONE_NEWNET = 0x20000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
REPORT_TIMEOUT = 30.0


@dataclass
class Blank:
    pid: int                 # host pid of the blank task
    keep: int                # write end of its pipe: close after taking it over
    init_pid: int | None = None   # our namespace init, if we made one


def _wait_blank(r: int) -> None:
    """The blank's whole life as lcr code: wait to be taken over."""
    try:
        os.read(r, 1)
    finally:
        os._exit(127)


def in_host(want: int | None) -> Blank:
    r, w = os.pipe()
    try:
        child = clone3_stopped_child(want)
    except OSError as e:
        os.close(r)
        os.close(w)
        if e.errno == errno.EEXIST:
            raise PidTaken(f"pid {want} is in use by another process",
                           "stop that process, or restart with --any-pid") from None
        if e.errno == errno.EPERM:
            raise RestoreError(f"not allowed to create a process with pid {want} "
                               "(needs CAP_CHECKPOINT_RESTORE)", "restart with --any-pid") from None
        raise KernelError(f"clone3 failed: {e.strerror}") from None
    if child == 0:
        os.close(w)
        _wait_blank(r)
    os.close(r)
    return Blank(child, w)


def _unshare(flags: int) -> None:
    if libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


CAP_SYS_ADMIN = 21


def _has_cap(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def enter_namespaces(user_ns: bool, extra: int = 0, join: list[int] | None = None) -> None:
    """unshare a pid namespace (and a user namespace mapping us to ourselves,
    and the ``extra`` CLONE_NEW* kinds: resources/namespaces.py).
    Root without CAP_SYS_ADMIN (a container's default capabilities) takes a
    user namespace too: inside it, it has what a new pid namespace and
    clone3 set_tid ask for (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE there).
    ``join``: fds of namespaces made beforehand (sys/nshelper.py: a user
    namespace first, if any, then a network namespace with lo up), entered
    instead of making those kinds."""
    user_ns = user_ns or not _has_cap(CAP_SYS_ADMIN)
    uid, gid = os.geteuid(), os.getegid()
    if join:
        for fd in join:
            setns(fd)
        if len(join) > 1:
            user_ns = False          # joined: the helper made and mapped it
        extra &= ~CLONE_NEWNET
    _unshare(CLONE_NEWPID | (CLONE_NEWUSER if user_ns else 0) | extra)
    if user_ns:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        try:
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
        except PermissionError:
            # Linux 5.12+: mapping uid 0 needs CAP_SETFCAP where we unshared
            raise RestoreError(f"cannot map uid {uid} into a new user namespace"
                               + (" (root needs CAP_SETFCAP for that)" if uid == 0 else ""),
                               "in a container: --cap-add SETFCAP, or run as a non-root user"
                               ) from None
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    if extra & CLONE_NEWNS:
        _private_mounts()
    if extra & CLONE_NEWNET:
        loopback_up()


def _private_mounts() -> None:
    """Mounts made in the tree's mount namespace stay there."""
    if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"making / private: {os.strerror(e)}")


def become_init() -> None:
    """pid 1 of our namespace: reap orphans until nobody is left, then go."""
    name = ctypes.create_string_buffer(b"lcr-init")   # kept alive across the call
    prctl(15, ctypes.addressof(name))                  # PR_SET_NAME
    fd = os.open("/dev/null", os.O_RDWR)
    for i in range(3):
        os.dup2(fd, i)
    os.closerange(3, 1 << 16)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue


def _report(fd: int, msg: str) -> None:
    os.write(fd, msg.encode() + b"\n")


def in_new_namespaces(vpid: int, user_ns: bool, extra: int = 0,
                      join: list[int] | None = None) -> Blank:
    """A blank with pid ``vpid`` inside a fresh pid namespace (see module doc)."""
    r, w = os.pipe()
    rep_r, rep_w = os.pipe()
    h = os.fork()
    if h == 0:   # helper: makes the namespaces, forks into them, leaves
        try:
            os.close(w)
            os.close(rep_r)
            enter_namespaces(user_ns, extra, join)
            first = os.fork()          # pid 1 of the new namespace
            if first == 0:
                if vpid == 1:
                    _wait_blank(r)
                try:
                    child = clone3_stopped_child(vpid)
                except OSError as e:
                    _report(rep_w, f"ERR clone3 with pid {vpid} in the new namespace: {e.strerror}")
                    os._exit(1)
                if child == 0:
                    _wait_blank(r)
                os.close(r)
                _report(rep_w, "INIT")
                os.close(rep_w)
                become_init()
            _report(rep_w, f"FIRST {first}")
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - reported to lcr, never raised here
            try:
                _report(rep_w, f"ERR {e}")
            finally:
                os._exit(1)
    os.close(r)
    os.close(rep_w)
    try:
        lines = _read_reports(rep_r, 1 if vpid == 1 else 2)
    finally:
        os.close(rep_r)
        os.waitpid(h, 0)
    errs = [ln[4:] for ln in lines if ln.startswith("ERR ")]
    first = next((int(ln.split()[1]) for ln in lines if ln.startswith("FIRST ")), None)
    if errs or first is None:
        os.close(w)
        hint = "unprivileged user namespaces may be disabled" if user_ns else None
        raise RestoreError(f"cannot create the namespaces to restore into: "
                           f"{errs[0] if errs else 'no report from the helper'}", hint)
    if vpid == 1:
        return Blank(first, w)
    with open(f"/proc/{first}/task/{first}/children") as f:
        kids = [int(x) for x in f.read().split()]
    if len(kids) != 1:
        os.close(w)
        raise RestoreError("the namespace init lost its child")
    return Blank(kids[0], w, init_pid=first)


def _read_reports(fd: int, want: int) -> list[str]:
    buf = b""
    lines: list[str] = []
    while len(lines) < want:
        ready, _, _ = select.select([fd], [], [], REPORT_TIMEOUT)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split(b"\n")
        lines += [d.decode(errors="replace") for d in done]
        if any(ln.startswith("ERR ") for ln in lines):
            break
    return lines


def run_in_namespace(argv: list[str], log: str | None, cwd: str | None = None,
                     extra: int = 0, hostname: str | None = None) -> int:
    """`lcr run`: start argv as pid 1 of a fresh pid namespace (and user
    namespace when not root; and the ``extra`` CLONE_NEW* kinds: `--ipc`
    ...), in its own session, detached; returns its pid as lcr sees it.
    Exec failures come back through a close-on-exec pipe."""
    rep_r, rep_w = os.pipe()
    h = os.fork()
    if h == 0:
        try:
            os.close(rep_r)
            enter_namespaces(os.geteuid() != 0, extra)
            if hostname is not None:   # here, where we may: without root the command cannot
                socket.sethostname(hostname)
            c = os.fork()
            if c == 0:
                try:
                    os.setsid()
                    if cwd:
                        os.chdir(cwd)
                    null = os.open("/dev/null", os.O_RDONLY)
                    os.dup2(null, 0)
                    if log:
                        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                        os.dup2(out, 1)
                        os.dup2(out, 2)
                    close_all_but({rep_w})
                    # pid 1 is the init of run_init.py (forwards signals, reaps); it
                    # reports CMD's exec failure on rep_w and closes it
                    os.set_inheritable(rep_w, True)
                    try:
                        os.execv(sys.executable, run_init.argv(rep_w, argv))
                    except OSError:
                        run_init.run_here(rep_w, argv)
                except BaseException as e:  # noqa: BLE001
                    _report(rep_w, f"ERR cannot run {argv[0]}: {getattr(e, 'strerror', None) or e}")
                    os._exit(127)
            _report(rep_w, f"FIRST {c}")
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            try:
                _report(rep_w, f"ERR {e}")
            finally:
                os._exit(1)
    os.close(rep_w)
    try:
        # FIRST comes from the helper; an ERR from the command, if exec failed,
        # arrives before EOF (the pipe closes on exec or exit).
        lines = []
        buf = b""
        while True:
            chunk = os.read(rep_r, 4096)
            if not chunk:
                break
            buf += chunk
        lines = [ln.decode(errors="replace") for ln in buf.split(b"\n") if ln]
    finally:
        os.close(rep_r)
        os.waitpid(h, 0)
    errs = [ln[4:] for ln in lines if ln.startswith("ERR ")]
    first = next((int(ln.split()[1]) for ln in lines if ln.startswith("FIRST ")), None)
    if errs or first is None:
        raise RestoreError(errs[0] if errs else "could not start the command in a new namespace")
    return first
