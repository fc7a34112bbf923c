"""UNIX sockets that are not one end of a connected pair: listening (stream
or seqpacket), bound to a name (a path, or an abstract @name) or not, and
unconnected datagram sockets with the datagrams still queued.

Dump: name, backlog, options and shutdown state come from sock_diag and
getsockopt on lcr's own copy of the socket; queued datagrams are read
without being consumed (SO_PEEK_OFF + MSG_PEEK, see unix_sockets.py).
A listener with connections waiting to be accepted is refused: those
connections are half-made kernel objects a restore cannot rebuild.

Restore, in lcr before the tasks exist: socket(), the options, bind() to the
same name -- a socket file left at the saved path is removed first only if
it is a socket file no socket is bound to any more (the checkpoint killed
its owner), anything else there is refused -- the file's permissions and
owner, listen() with the saved backlog, then each queued datagram is sent
again from a temporary unbound socket.  Restored datagrams therefore come
from an unnamed sender (recvfrom() gives no address) and carry lcr's
credentials if SO_PASSCRED is on.

A datagram socket connect()ed to a socket that is not connected back (the
clients of a /dev/log-style server, bound or not) is this kind too: the
peer's name is saved, and the task connects to it again (after_install),
once every socket of the tree is bound; a peer outside the tree must be
there (bound to the same name) at the restart.

Connected ends (socketpair, or an accept()ed connection and its client)
are unix_sockets.py's, via files.py; this kind never matches them."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import SockOpts, UnixBoundState
from linuxcr.resources import unix_sockets
from linuxcr.sys import sockdiag

TYPES = unix_sockets.TYPES


def _norm(name: bytes) -> bytes:
    """A path name as bind() got it may end with its NUL terminator(s)."""
    return name if name[:1] == b"\0" else name.split(b"\0", 1)[0]


def _named(name: bytes) -> str:
    if not name:
        return "unbound"
    if name[:1] == b"\0":
        return "@" + name[1:].decode(errors="replace")
    return name.decode(errors="replace")


def read_opts(s: socket.socket) -> SockOpts:
    """The SOL_SOCKET options lcr restores (shared with tcp.py and udp.py)."""
    def g(opt: int, default: int = 0) -> int:
        try:
            return s.getsockopt(socket.SOL_SOCKET, opt)
        except OSError:     # not an option of this family (SO_PASSCRED on TCP), or an older kernel
            return default
    onoff, secs = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    lock = g(sockdiag.SO_BUF_LOCK)
    return SockOpts(rcvbuf=g(socket.SO_RCVBUF), sndbuf=g(socket.SO_SNDBUF), buf_lock=lock & 3,
                    reuseaddr=bool(g(socket.SO_REUSEADDR)), reuseport=bool(g(socket.SO_REUSEPORT)),
                    keepalive=bool(g(socket.SO_KEEPALIVE)), broadcast=bool(g(socket.SO_BROADCAST)),
                    passcred=bool(g(socket.SO_PASSCRED)), oobinline=bool(g(socket.SO_OOBINLINE)),
                    linger=secs if onoff else -1, peek_off=g(sockdiag.SO_PEEK_OFF, -1))


def apply_opts(s: socket.socket, o: SockOpts, *, bufs: bool = True) -> None:
    """Put the saved options on a new socket (before bind, so that
    SO_REUSEADDR/PORT take part in it).  Buffer sizes only if the program had
    set them (SO_BUF_LOCK): a size set by hand stops the kernel's autotuning."""
    so = socket.SOL_SOCKET
    s.setsockopt(so, socket.SO_REUSEADDR, int(o.reuseaddr))
    if o.reuseport:
        s.setsockopt(so, socket.SO_REUSEPORT, 1)
    for opt, on in ((socket.SO_KEEPALIVE, o.keepalive), (socket.SO_BROADCAST, o.broadcast),
                    (socket.SO_PASSCRED, o.passcred), (socket.SO_OOBINLINE, o.oobinline)):
        if on:
            s.setsockopt(so, opt, 1)
    if o.linger >= 0:
        s.setsockopt(so, socket.SO_LINGER, struct.pack("ii", 1, o.linger))
    if bufs:
        set_buffers(s, o.sndbuf if o.buf_lock & 1 else 0, o.rcvbuf if o.buf_lock & 2 else 0)
        lock_buffers(s, o.buf_lock)


def set_buffers(s: socket.socket, sndbuf: int, rcvbuf: int) -> None:
    """Sizes as getsockopt reported them (the kernel doubles what it is given);
    root is not held to net.core.[rw]mem_max, like the program that set them."""
    for size, force, plain in ((sndbuf, sockdiag.SO_SNDBUFFORCE, socket.SO_SNDBUF),
                               (rcvbuf, sockdiag.SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        if size:
            try:
                s.setsockopt(socket.SOL_SOCKET, force, max(size // 2, 1024))
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, plain, max(size // 2, 1024))


def lock_buffers(s: socket.socket, lock: int) -> None:
    """SO_BUF_LOCK as saved: 0 gives the sizes back to the kernel's autotuning."""
    try:
        s.setsockopt(socket.SOL_SOCKET, sockdiag.SO_BUF_LOCK, lock)
    except OSError:
        pass   # before Linux 5.14: sizes stay as set


def set_peek_off(s: socket.socket, o: SockOpts) -> None:
    if o.peek_off >= 0:
        s.setsockopt(socket.SOL_SOCKET, sockdiag.SO_PEEK_OFF, o.peek_off)


@contextlib.contextmanager
def in_dir(path: str):
    """Run with lcr's working directory at ``path`` ("" : stay), for names
    that are relative (bind() and sendto() resolve them from the cwd)."""
    if not path:
        yield
        return
    back = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(path)
        except OSError as e:
            raise RestoreError(f"cannot enter {path} to bind a UNIX socket there: {e.strerror}",
                               "the directory must exist at the same path on this machine") from None
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def _socket_path(pid: int, name: bytes) -> tuple[str, str]:
    """(the directory a relative name was bound from -- "" if absolute --,
    the file's full path)."""
    path = os.fsdecode(name)
    if path.startswith("/"):
        return "", path
    cwd = os.readlink(f"/proc/{pid}/cwd")
    return cwd, os.path.join(cwd, path)


class UnixBound:
    name = "unix_bound"

    def matches(self, ctx) -> bool:
        if not ctx.link.startswith("socket:"):
            return False
        d = sockdiag.unix_diag(ctx.st.st_ino)
        if d is None:
            return False
        if d.type == socket.SOCK_DGRAM:    # a server others connect() to says ESTABLISHED, no peer
            return not d.peer or one_way(d)
        if d.state == unix_sockets.TCP_LISTEN or not d.peer and d.state != unix_sockets.TCP_ESTABLISHED:
            return True
        return not d.peer and listener_of(d.ino) is not None   # connected, not accepted yet

    def reason(self, ctx) -> str | None:
        ino = ctx.st.st_ino
        d = sockdiag.unix_diag(ino)
        if d is None:
            return f"UNIX socket:[{ino}] vanished while being inspected"
        name = _norm(d.name)
        where = f"UNIX socket:[{ino}] ({_named(name)})"
        if d.type not in TYPES:
            return f"{where} of type {d.type}: not supported"
        if name[:1] == b"\0" and not sockdiag.same_netns(ctx.pid):
            return f"{where}: abstract names of another network namespace are not supported"
        if one_way(d):
            peer = sockdiag.unix_diag(d.peer)
            pname = _norm(peer.name) if peer else b""
            if not pname or (pname[:1] != b"\0" and not pname.startswith(b"/")):
                return (f"{where} is connected to socket:[{d.peer}] ({_named(pname)}): only a "
                        "peer bound to an absolute path or an abstract name can be reached again")
        if d.state == unix_sockets.TCP_LISTEN and d.rqueue:
            why = _pending_reason(d)
            if why:
                return (f"{where} is listening with {d.rqueue} connection(s) not accepted yet, "
                        f"{why}: cannot be checkpointed until the program accepts them")
        if d.state == unix_sockets.TCP_ESTABLISHED and not d.peer and d.type != socket.SOCK_DGRAM:
            lst = listener_of(d.ino)
            lname = _norm(lst.name) if lst else b""
            if lst is None or (lname[:1] != b"\0" and not lname.startswith(b"/")):
                return (f"{where} waits to be accepted by {_named(lname)}: only a listener "
                        "bound to an absolute path or an abstract name can be reached again")
        if name and name[:1] != b"\0":
            _cwd, path = _socket_path(ctx.pid, name)
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and (d.vfs is None or (sockdiag.kernel_dev(st.st_dev), st.st_ino) != d.vfs):
                return (f"{where}: another file took the place of its socket file since bind() "
                        "(or it is a relative name no longer reachable from the working "
                        "directory): cannot be bound again; close it or remove that file")
        return None

    def dump(self, ctx) -> UnixBoundState:
        ino = ctx.st.st_ino
        d = sockdiag.unix_diag(ino)
        if d is None:
            raise RestoreError(f"pid {ctx.pid} fd {ctx.fd}: socket:[{ino}] vanished")
        why = self.reason(ctx)
        if why:
            raise RestoreError(f"pid {ctx.pid} fd {ctx.fd}: {why}")
        cwd, mode, uid, gid, unlinked = "", 0o777, 0, 0, False
        name = _norm(d.name)
        if name and name[:1] != b"\0":
            cwd, path = _socket_path(ctx.pid, name)
            try:
                st = os.stat(path)
                mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            except FileNotFoundError:     # removed since bind(): bound again, then removed
                unlinked = True
        with sockdiag.grab_socket(ctx.pid, ctx.fd) as s:
            listening = d.state == unix_sockets.TCP_LISTEN
            queue, extras = unix_sockets.peek_full(s, ctx.pid, ctx.fd, ino, ctx.adopt) \
                if d.rqueue and not listening else ([], [])
            peer = sockdiag.unix_diag(d.peer) if one_way(d) else None
            lst = listener_of(ino) if d.state == unix_sockets.TCP_ESTABLISHED and not d.peer \
                and d.type != socket.SOCK_DGRAM else None
            return UnixBoundState(sotype=d.type, name=name, cwd=cwd, mode=mode, uid=uid, gid=gid,
                                  peer_name=_norm(peer.name) if peer else b"",
                                  listening=listening, backlog=d.wqueue if listening else 0,
                                  shutdown=d.shutdown & 3, opts=read_opts(s), queue=queue,
                                  extras=extras, ino=ino, unlinked=unlinked, pending_on=lst.ino if lst else 0,
                                  pending=sockdiag.unix_icons(ino) if listening and d.rqueue else [])

    def open(self, state: UnixBoundState, flags: int) -> int:
        if state.sotype not in TYPES:
            raise RestoreError(f"image holds a UNIX socket of unknown type {state.sotype}")
        s = sockdiag.new_socket(socket.AF_UNIX, state.sotype)
        try:
            apply_opts(s, state.opts)
            with in_dir(state.cwd):
                if state.name:
                    _bind(s, state)
                if state.listening:
                    s.listen(state.backlog)
            set_peek_off(s, state.opts)
            s.setblocking(not flags & os.O_NONBLOCK)
        except BaseException:
            s.close()
            raise
        return s.detach()

    def after_open(self, fd: int, state: UnixBoundState, env) -> None:
        """The queued datagrams, once every file they may carry is open
        (files.open_all), each from a socket bound to its sender's name;
        a listener's waiting connections, made again in their order from
        the restored clients."""
        with in_dir(state.cwd):
            if state.queue:
                _refill(fd, state, env)
            if state.pending:
                _reconnect(state, env)

    def finish_open(self, fd: int, state: UnixBoundState, env) -> None:
        if state.unlinked:      # bound, queues refilled: now its file goes, as it had
            with in_dir(state.cwd), contextlib.suppress(FileNotFoundError):
                os.unlink(os.fsdecode(state.name))
        how = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}.get(state.shutdown)
        if how is not None:
            s = socket.socket(fileno=os.dup(fd))
            with contextlib.suppress(OSError), s:
                s.shutdown(how)

    def after_install(self, t, arena, fd: int, state: UnixBoundState, table) -> None:
        """A datagram socket connect()ed to a named peer: connected again
        inside the task once every socket of the tree is bound."""
        if not state.peer_name:
            return
        addr = struct.pack("<H", socket.AF_UNIX) + state.peer_name
        if state.peer_name[:1] != b"\0":
            addr += b"\0"
        try:
            t.syscall("connect", fd, arena.put(addr), len(addr))
        except OSError as e:
            raise RestoreError(f"fd {fd}: cannot connect a UNIX datagram socket to "
                               f"{_named(state.peer_name)} again: {e.strerror}",
                               "the program it sends to must be running (or restored with it)") from None


def one_way(d) -> bool:
    """A datagram socket connect()ed to a socket that is not connected back
    (a client of a /dev/log-style server)."""
    if d.type != socket.SOCK_DGRAM or not d.peer:
        return False
    peer = sockdiag.unix_diag(d.peer)
    return peer is None or peer.peer != d.ino


def _bind(s: socket.socket, state: UnixBoundState) -> None:
    name = state.name
    shown = _named(name)
    if name[:1] != b"\0":
        path = os.fsdecode(name)
        full = os.path.join(state.cwd, path) if state.cwd else path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and state.unlinked:
            raise RestoreError(f"cannot bind a UNIX socket to {full} again: its file had been "
                               "removed, and a file is there now", "move it out of the way")
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise RestoreError(f"cannot bind a UNIX socket to {full}: a file that is not a "
                                   "socket is there", "move it out of the way")
            if _in_use(st):
                raise RestoreError(f"cannot bind a UNIX socket to {full}: a socket is bound to it",
                                   "was the checkpoint taken with --leave-running? stop the "
                                   "program that holds it")
            os.unlink(path)     # a stale socket file: its socket is gone
    try:
        s.bind(name)
    except OSError as e:
        raise RestoreError(f"cannot bind a UNIX socket to {shown}: {e.strerror}",
                           "is the name in use? (was the checkpoint taken with --leave-running?)"
                           ) from None
    if name[:1] != b"\0":
        path = os.fsdecode(name)
        os.chmod(path, state.mode)
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (state.uid, state.gid):
            with contextlib.suppress(PermissionError):
                os.chown(path, state.uid, state.gid)


def _in_use(st: os.stat_result) -> bool:
    """Is some socket still bound to this socket file?"""
    key = (sockdiag.kernel_dev(st.st_dev), st.st_ino)
    if any(d.vfs == key for d in sockdiag.unix_all()):
        return True
    if sockdiag.netns_ino() == os.stat("/proc/self/ns/net").st_ino:
        return False
    with sockdiag.inside(None):     # an `lcr run --net` tree's: lcr's namespace too
        return any(d.vfs == key for d in sockdiag.unix_all())


def _refill(fd: int, state: UnixBoundState, env) -> None:
    """Queue the saved datagrams again (lcr runs in the directory of a
    relative name, see in_dir).  A datagram keeps its sender's name: it is
    sent from the restored socket bound to that name, or else from a
    temporary socket bound to it for the time of the send; only if the
    name is taken by a socket outside the image does it come unnamed."""
    if state.sotype != socket.SOCK_DGRAM or not state.name:
        raise RestoreError("image holds queued messages for a UNIX socket that cannot receive any")
    where = f"UNIX socket {_named(state.name)}"
    by_index = {e.index: e for e in state.extras}
    anon: socket.socket | None = None
    try:
        for i, m in enumerate(state.queue):
            extra = by_index.get(i)
            anc = unix_sockets.ancillary(extra, env.ours, where)
            sender = extra.sender if extra else b""
            try:
                if sender and sender in env.names:
                    with socket.socket(fileno=os.dup(env.names[sender])) as s:
                        unix_sockets.send_one(s, m, anc, state.name)
                    continue
                if sender and _send_as(sender, m, anc, state.name):
                    continue
                if anon is None:
                    anon = _sender()
                try:
                    unix_sockets.send_one(anon, m, anc, state.name)
                except BlockingIOError:     # this sender's budget is spent: another one
                    anon.close()
                    anon = _sender()
                    unix_sockets.send_one(anon, m, anc, state.name)
            except OSError as e:
                raise RestoreError(f"cannot queue {len(state.queue)} datagrams again on {where}: "
                                   f"{e.strerror}", "net.unix.max_dgram_qlen may be lower than "
                                   "where the image was taken") from None
    finally:
        if anon is not None:
            anon.close()


def listener_of(ino: int):
    """The listener a connected-but-not-accepted socket waits on (or None)."""
    for d in sockdiag.unix_all():
        if d.state == unix_sockets.TCP_LISTEN and d.rqueue and ino in sockdiag.unix_icons(d.ino):
            return d
    return None


def _pending_reason(d) -> str | None:
    """Why the connections waiting on listener ``d`` cannot be made again
    (their clients must not have sent anything: those bytes sit in a socket
    no one holds until accept(), which lcr will not do for the program)."""
    for ino in sockdiag.unix_icons(d.ino):
        if not ino:
            return "one of whose clients has closed"
        c = sockdiag.unix_diag(ino)
        if c is None or c.wqueue:
            return f"whose client socket:[{ino}] has sent data already"
    return None


def _reconnect(state: UnixBoundState, env) -> None:
    """connect() each saved client again, oldest first, so that accept()
    returns them in the same order (a client the image lacks: made and
    closed, as the program would see a client that went away)."""
    clients = {d.state.ino: env.ours[d.fid] for d in env.descs
               if d.kind == "unix_bound" and d.state.pending_on == state.ino}
    for ino in state.pending:
        fd = clients.get(ino)
        s = socket.socket(fileno=os.dup(fd)) if fd is not None else \
            sockdiag.new_socket(socket.AF_UNIX, state.sotype)
        try:
            s.connect(state.name)
        except OSError as e:
            raise RestoreError(f"cannot connect a waiting client to {_named(state.name)} again: "
                               f"{e.strerror}") from None
        finally:
            s.close()


def _sender() -> socket.socket:
    s = sockdiag.new_socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    set_buffers(s, 1 << 24, 0)
    return s


def _send_as(name: bytes, m: bytes, anc: list, dest: bytes) -> bool:
    """Send from a temporary socket bound to ``name`` (False: the name is taken)."""
    s = _sender()
    try:
        try:
            s.bind(name)
        except OSError:
            return False
        try:
            unix_sockets.send_one(s, m, anc, dest)
        finally:
            if name[:1] != b"\0":
                with contextlib.suppress(OSError):
                    os.unlink(name)
        return True
    finally:
        s.close()


KIND = UnixBound()
