"""A small forked helper that lives in another network namespace (and the
user namespace that owns it, when lcr is not root) and makes sockets there
for lcr: a socket is created in the network namespace of the process that
calls socket(), and stays in it wherever its fd goes afterwards.  lcr binds,
listens, connects, queries (a NETLINK_SOCK_DIAG socket answers about the
namespace it was made in) and repairs these sockets itself.

Two ways to get one:
- ``NsHelper.join(pid)``: setns() into pid's user (first, when lcr is not
  root and it differs) and network namespaces -- a checkpoint of a tree
  started with `lcr run --net`;
- ``NsHelper.fresh(user_ns)``: unshare a new network namespace (and a user
  namespace mapping lcr's uid and gid to themselves, when ``user_ns``),
  loopback up -- a restart, before the tree's tasks exist; the blank task
  joins these namespaces later (``ns_fds``).

The helper is a fork of lcr that keeps only its end of a SOCK_SEQPACKET
socketpair: each request is three ints (family, type, protocol), each
answer an errno (0: the socket comes with it, SCM_RIGHTS).  It exits when
lcr closes its end (or dies: PR_SET_PDEATHSIG)."""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct

from linuxcr.sys.ipc import setns
from linuxcr.sys.syscalls import libc, prctl

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG = 1
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
_REQ = struct.Struct("<iii")
_ANS = struct.Struct("<i")


def loopback_up() -> None:
    """A fresh network namespace has lo down: up, as `ip link set lo up`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, ifr)


def _unshare(flags: int) -> None:
    if libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _map_self(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _ino(path: str) -> int:
    return os.stat(path).st_ino


class NsHelper:
    """lcr's end of a helper (see the module doc)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self.netns = _ino(f"/proc/{pid}/ns/net")

    # --- making one ----------------------------------------------------------

    @classmethod
    def join(cls, pid: int) -> "NsHelper":
        """A helper in ``pid``'s network namespace (and its user namespace
        first when lcr is not root and that differs from lcr's)."""
        kinds = []
        if os.geteuid() != 0 and _ino(f"/proc/{pid}/ns/user") != _ino("/proc/self/ns/user"):
            kinds.append("user")
        kinds.append("net")
        fds: list[int] = []
        try:
            for k in kinds:
                fds.append(os.open(f"/proc/{pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC))
            return cls._start(lambda: [setns(fd) for fd in fds])
        finally:
            for fd in fds:
                os.close(fd)

    @classmethod
    def fresh(cls, user_ns: bool) -> "NsHelper":
        """A helper in a new network namespace with loopback up (owned by a
        new user namespace when ``user_ns``)."""
        uid, gid = os.geteuid(), os.getegid()

        def enter() -> None:
            _unshare(CLONE_NEWNET | (CLONE_NEWUSER if user_ns else 0))
            if user_ns:
                _map_self(uid, gid)
            loopback_up()
        return cls._start(enter)

    @classmethod
    def _start(cls, enter) -> "NsHelper":
        """Fork the helper; ``enter()`` runs in it first.  On any failure
        here (its refusal, ^C, SIGTERM) the helper is killed and reaped and
        both ends of the pair closed: nothing of it outlives the call."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # ^C/SIGTERM held back over the fork (their handlers, run in an
        # at-fork hook, would be swallowed there); delivered right after
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _QUIET)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            ours.close()
            theirs.close()
            raise
        if pid == 0:     # single-threaded: setns(user) is allowed here
            code = 0
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                for s in _QUIET:          # lcr ends it (close, or its death): not ^C
                    signal.signal(s, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                try:
                    enter()
                except OSError as e:
                    theirs.send(_ANS.pack(-(e.errno or 1)))
                    os._exit(1)
                keep = theirs.fileno()      # nothing of lcr's held open here
                os.closerange(3, keep)
                os.closerange(keep + 1, 1 << 16)
                theirs.send(_ANS.pack(0))
                _serve(theirs)
            except BaseException:  # noqa: BLE001 - the helper never returns into lcr's code
                code = 1
            os._exit(code)
        ok = False
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            theirs.close()
            try:
                got = ours.recv(_ANS.size)
                err = _ANS.unpack(got)[0] if len(got) == _ANS.size else -errno.EIO
            except OSError as e:
                err = -(e.errno or errno.EIO)
            if err:
                e = -err
                raise OSError(e, f"cannot enter the network namespace: {os.strerror(e)}")
            helper = cls(pid, ours)
            ok = True
            return helper
        finally:
            if not ok:
                theirs.close()
                ours.close()
                _kill_reap(pid)

    # --- using it ------------------------------------------------------------

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A new socket made in the helper's network namespace."""
        self._sock.send(_REQ.pack(family, type, proto))
        fds = array.array("i")
        msg, anc, _flags, _addr = self._sock.recvmsg(_ANS.size, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if len(msg) != _ANS.size:
            for fd in fds:
                os.close(fd)
            raise OSError(0, "the helper in the network namespace died")
        err = _ANS.unpack(msg)[0]
        if err or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(err or 1, os.strerror(err or 1))
        return socket.socket(fileno=fds[0])

    def ns_fds(self) -> list[int]:
        """New fds (O_CLOEXEC) of the helper's user namespace (if it is not
        lcr's) and network namespace, in the order to setns() them."""
        kinds = ["net"]
        if _ino(f"/proc/{self.pid}/ns/user") != _ino("/proc/self/ns/user"):
            kinds.insert(0, "user")
        return [os.open(f"/proc/{self.pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC) for k in kinds]

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:        # shutdown, not only close: a fork of lcr may hold a copy of this end
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)      # it exits at end-of-file
        except ChildProcessError:
            pass
        except BaseException:            # ^C meanwhile: not left behind either
            _kill_reap(self.pid)
            raise

    def __enter__(self) -> "NsHelper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_QUIET = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _kill_reap(pid: int) -> None:
    """Our helper child (not yet reaped: its pid is still its own) gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _serve(s: socket.socket) -> None:
    while True:
        req = s.recv(64)
        if len(req) != _REQ.size:
            return
        family, stype, proto = _REQ.unpack(req)
        try:
            made = socket.socket(family, stype | socket.SOCK_CLOEXEC, proto)
        except OSError as e:
            s.send(_ANS.pack(e.errno or 1))
            continue
        with made:
            s.sendmsg([_ANS.pack(0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        struct.pack("i", made.fileno()))])
