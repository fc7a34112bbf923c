"""The per-user snapshot agent, and its client.

Snapshots (engine/snapshots.py) outlive the lcr command that took them: a
small daemon per user holds them.  It is the ptrace tracer of every
snapshot child (ptrace belongs to the tracer thread, so the agent serves
requests from one thread, one at a time); PTRACE_O_EXITKILL makes the kernel
kill every snapshot child when the agent dies.

Where: $LCR_AGENT_DIR, else $XDG_RUNTIME_DIR/lcr, else /tmp/lcr-$UID (mode
0700), holding agent.sock (0600), agent.lock, agent.pid and agent.log.

Protocol: one JSON object per line each way over the UNIX stream socket;
an image's fd travels with its request as SCM_RIGHTS.  Every request is
authenticated with SO_PEERCRED: only root or the owner of the process may
snapshot it or use its crids.

    {"op": "snapshot", "pid": P}                 -> {"ok": true, "crid": C, ...}
    {"op": "list", "pid": P|null}                -> {"ok": true, "snapshots": [...]}
    {"op": "writeback", "crid": C, "compress": b} + fd
    {"op": "rollback", "crid": C, "memory_only": b, "full": b, "note": s}
                                  -> {"ok": true, "path": "fast"|"full"|"mixed",
                                      "pages_copied": N, "pages_dropped": M, "per_process": [...]}
    {"op": "discard", "crid": C}
    {"op": "tracker_put", "pid": P, "starttime": T, "epoch": E, "written": [[s, e], ...]?} + fd
    {"op": "tracker_take", "pid": P, "starttime": T, "with_written": b}
                                  -> {"ok": true, "epoch": E, "written": [[s, e], ...]?} + fd
    {"op": "tracker_drop", "pid": P}               -> {"ok": true, "dropped": b}
    {"op": "ping"} / {"op": "quit"}
errors: {"ok": false, "class": "NoSuchProcess", "error": msg, "hint": h, ...}

Dirty-page trackers (resources/dirty.py): a short-lived `lcr checkpoint
--track` hands the agent its tracker's userfaultfd (SCM_RIGHTS) so that it
outlives the command; a later `lcr checkpoint --parent` takes it back.  One
tracker per pid (a new one replaces the old), usable by the process's owner
or root; the agent closes it when the tracked process dies.  `list` shows
them under "trackers".

The same one tracker per process serves the snapshots (fast rollback:
engine/snapshots.py, "write trackers"): `snapshot` starts one (or resets
the one held); it is closed when neither a snapshot nor a --track
checkpoint wants it any more (discard, tracker_drop), when the process dies,
or with the agent.  Sharing rules: a reset for a snapshot loses the
incremental count since the epoch unless the taker asks ``with_written``
(then the spans reset here come with it); otherwise the epoch is handed
out as "" and the checkpoint compares contents.  Lent to a checkpoint, the
tracker's count is lost for the snapshots unless it comes back with
``written`` (every span that checkpoint collected with a reset): their
next rollback is then a full one.

Rolling back a process that took its own snapshot (linuxcr.transaction):
it was frozen inside the recv() waiting for the snapshot's reply, and that
is where the rollback brings it back.  The agent then sends, on that same
connection, the reply it reads: {"ok": true, "crid": C, "rolled_back": true,
"note": ...}; the snapshot call "returns twice", like setjmp.
"""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

from linuxcr import errors
from linuxcr.errors import LcrError, NotCheckpointable, PermissionDenied

MAX_LINE = 1 << 20
IDLE_EXIT = float(os.environ.get("LCR_AGENT_IDLE", "600"))   # seconds, with no snapshot held
START_TIMEOUT = 15.0


class AgentError(LcrError):
    exit_code = 13


class SnapshotLimit(LcrError):
    exit_code = 14


class NoTracker(AgentError):
    """The agent holds no dirty-page tracker for that process."""


class RolledBack(LcrError):
    """Raised by ``transaction().__enter__`` when the process comes back from
    a rollback: the state is the one before the ``with`` block."""
    exit_code = 15


def runtime_dir() -> Path:
    env = os.environ.get("LCR_AGENT_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.geteuid():
        return Path(xdg) / "lcr"
    return Path(f"/tmp/lcr-{os.geteuid()}")


def _ensure_dir(d: Path) -> None:
    try:
        d.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = d.lstat()
    if not d.is_dir() or d.is_symlink() or st.st_uid != os.geteuid():
        raise AgentError(f"{d} is not a directory of ours", "remove it or set LCR_AGENT_DIR")


def _limits() -> tuple[int, int]:
    n = int(os.environ.get("LCR_MAX_SNAPSHOTS", "16"))
    mem = os.environ.get("LCR_MAX_SNAPSHOT_MEMORY")
    if mem:
        return n, int(mem)
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    return n, total // 2


# ==========================================================================
# the server

class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        self.pid, self.uid = pid, uid
        self.open = True

    def send(self, obj: dict, fds: list[int] = ()) -> None:
        data = (json.dumps(obj) + "\n").encode()
        try:
            self.sock.setblocking(True)
            if fds:
                n = socket.send_fds(self.sock, [data], list(fds))
                data = data[n:]
            self.sock.sendall(data)
        except OSError:
            pass

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds


class Agent:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.snaps: dict = {}                 # crid -> engine Snapshot
        from linuxcr.engine.snapshots import WriteTrackers
        # pid -> Tracked: one write tracker per process, for its snapshots and
        # for incremental checkpoints (--track) alike (engine/snapshots.py)
        self.wt = WriteTrackers()
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.max_snaps, self.max_mem = _limits()
        self.last_busy = time.monotonic()
        self.quit = False

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", flush=True)

    def serve(self, listener: socket.socket) -> None:
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.log(f"agent pid {os.getpid()} serving {self.dir}")
        while not self.quit:
            for key, _ in self.sel.select(timeout=1.0):
                if key.data is None:
                    s, _ = listener.accept()
                    try:
                        c = _Conn(s)
                    except OSError:
                        s.close()
                        continue
                    self.conns[s.fileno()] = c
                    self.sel.register(s, selectors.EVENT_READ, c)
                else:
                    self._readable(key.data)
            self._reap()
            if self.snaps or self.conns or self.wt.by_pid:
                self.last_busy = time.monotonic()
            elif time.monotonic() - self.last_busy > IDLE_EXIT:
                self.log("idle: exiting")
                break

    def _close(self, c: _Conn) -> None:
        if c.open:
            c.open = False
            self.sel.unregister(c.sock)
            self.conns.pop(c.sock.fileno(), None)
            for fd in c.take_fds():
                os.close(fd)
            c.sock.close()

    def _readable(self, c: _Conn) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(c.sock, 65536, 16)
        except OSError:
            data, fds = b"", []
        c.fds += fds
        if not data:
            self._close(c)
            return
        c.buf += data
        while c.open and b"\n" in c.buf:
            line, _, rest = bytes(c.buf).partition(b"\n")
            c.buf = bytearray(rest)
            self._request(c, line)
        if len(c.buf) > MAX_LINE:
            self._close(c)

    def _request(self, c: _Conn, line: bytes) -> None:
        try:
            req = json.loads(line)
            op = req.get("op")
            fn = getattr(self, f"op_{op}", None)
            if fn is None or not isinstance(req, dict):
                raise AgentError(f"unknown request {op!r}")
            reply = fn(c, req)
        except LcrError as e:
            reply = dict(ok=False, error=e.message, hint=e.hint, code=e.exit_code,
                         **{"class": type(e).__name__})
            if isinstance(e, NotCheckpointable):
                reply.update(pid=e.pid, reasons=e.reasons)
        except Exception as e:
            self.log("internal error:\n" + traceback.format_exc())
            reply = dict(ok=False, error=f"internal error in the agent: {type(e).__name__}: {e}",
                         hint=f"see {self.dir / 'agent.log'}", code=70, **{"class": "AgentError"})
        finally:
            for fd in c.take_fds():
                os.close(fd)
        if reply is not None:
            out = reply.pop("_fds", [])
            try:
                if c.open:
                    c.send(reply, out)
            finally:
                for fd in out:
                    os.close(fd)

    # --- helpers ----------------------------------------------------------
    def _reap(self) -> None:
        """Snapshot children killed from outside: forget their snapshots.
        Trackers of processes that died: closed."""
        from linuxcr.sys import ptrace
        for pid, tr in list(self.wt.by_pid.items()):
            if _starttime(pid) != tr.starttime:
                self.wt.drop(pid, "the process is gone")
                self.log(f"tracker of pid {pid}: the process is gone; closed")
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG | ptrace.WALL)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                for crid, s in list(self.snaps.items()):
                    if pid in s.children():
                        for part in s.parts:
                            if part.child.pid == pid:
                                part.child.attached = False
                        # the others of a tree snapshot are useless now
                        from linuxcr.engine import snapshots
                        snapshots.discard(s, self.wt)
                        del self.snaps[crid]
                        self.log(f"snapshot {crid}: its process {pid} died; forgotten")

    def _owner(self, pid: int) -> int:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            raise errors.NoSuchProcess(f"pid {pid}: no such process") from None

    def _may(self, c: _Conn, owner: int, what: str) -> None:
        if c.uid != 0 and c.uid != owner:
            raise PermissionDenied(f"{what} belongs to uid {owner}; you are uid {c.uid}",
                                   "only its owner or root may use it")

    def _snap(self, c: _Conn, req: dict):
        crid = str(req.get("crid", ""))
        s = self.snaps.get(crid)
        if s is None:
            raise errors.NoSuchProcess(f"no snapshot {crid!r}", "lcr snapshots lists them")
        self._may(c, s.uid, f"snapshot {crid}")
        return s

    def held(self) -> int:
        return sum(s.held() for s in self.snaps.values())

    # --- operations -------------------------------------------------------
    def op_ping(self, c: _Conn, req: dict) -> dict:
        return dict(ok=True, pid=os.getpid(), snapshots=len(self.snaps))

    def op_quit(self, c: _Conn, req: dict) -> dict:
        if c.uid not in (0, os.geteuid()):
            raise PermissionDenied("only the agent's owner may stop it")
        self.quit = True
        return dict(ok=True)

    def op_snapshot(self, c: _Conn, req: dict) -> dict:
        from linuxcr.engine import snapshots
        pid = int(req["pid"])
        self._may(c, self._owner(pid), f"pid {pid}")
        if len(self.snaps) >= self.max_snaps:
            raise SnapshotLimit(f"too many snapshots: {len(self.snaps)} held, the limit is "
                                f"{self.max_snaps}", "lcr discard some, or set LCR_MAX_SNAPSHOTS "
                                "for the agent")
        held = self.held()
        if held >= self.max_mem:
            raise SnapshotLimit(f"snapshots hold {held >> 20} MiB, the limit is {self.max_mem >> 20} MiB",
                                "lcr discard some, or set LCR_MAX_SNAPSHOT_MEMORY for the agent")
        held = {c for x in self.snaps.values() for c in x.children()}
        s = snapshots.take(pid, exclude=held, trackers=self.wt)
        s.extra["conn"] = c if c.pid == pid else None     # a process snapshotting itself
        self.snaps[s.crid] = s
        self.log(f"snapshot {s.crid} of pid {pid} ({len(s.parts)} process(es), frozen "
                 f"{s.frozen_seconds * 1e3:.1f} ms, children {s.children()})")
        return dict(ok=True, **s.info())

    def op_list(self, c: _Conn, req: dict) -> dict:
        pid = req.get("pid")
        out = [s.info() for s in self.snaps.values()
               if (c.uid in (0, s.uid)) and (pid is None or s.pid == int(pid))]
        trs = [tr.info() for tr in self.wt.by_pid.values()
               if tr.held() and (c.uid in (0, tr.uid)) and (pid is None or tr.pid == int(pid))]
        return dict(ok=True, snapshots=out, trackers=trs)

    # --- dirty-page trackers ---------------------------------------------
    def _tracker_may(self, c: _Conn, pid: int):
        tr = self.wt.get(pid)
        if tr is not None:
            self._may(c, tr.uid, f"the tracker of pid {pid}")
        return tr

    def op_tracker_put(self, c: _Conn, req: dict) -> dict:
        """A tracker handed in (--track), or one lent out coming back.
        ``written``: [[start, end], ...] the holder collected (and reset)
        while it held it: the snapshots of the process keep their count
        only with it."""
        from linuxcr.engine.snapshots import Tracked, _merge
        fds = c.take_fds()
        try:
            if len(fds) != 1:
                raise AgentError("tracker_put needs exactly one fd (the tracker's)")
            pid, start = int(req["pid"]), int(req["starttime"])
            owner = self._owner(pid)
            self._may(c, owner, f"pid {pid}")
            if _starttime(pid) != start:
                raise errors.NoSuchProcess(f"pid {pid}: no such process (it started at another "
                                           "time than the one given)")
            written = req.get("written")
            tr = self.wt.get(pid)
            if tr is not None and tr.starttime != start:
                self.wt.drop(pid, "the process is gone")
                tr = None
            if tr is not None and tr.lent:
                # ours, back: the snapshots' count survives only with what was reset meanwhile
                tr.lent = False
                if written is None:
                    tr._lose("an incremental checkpoint reset the write tracker")
                else:
                    tr.fold(_merge([(int(a), int(b)) for a, b in written]))
                tr.fd = fds.pop()
            else:
                parts = []
                if tr is not None:           # a new one replaces the old
                    parts = tr.parts
                    self.wt.drop(pid, "its write tracker was replaced")
                tr = Tracked(pid=pid, starttime=start, uid=owner, fd=fds.pop(), parts=parts)
                self.wt.by_pid[pid] = tr
            tr.epoch, tr.since_epoch, tr.epoch_lost = str(req.get("epoch", "")), [], False
            tr.since = time.time()
        finally:
            for fd in fds:
                os.close(fd)
        self.log(f"tracker of pid {pid} held (epoch {tr.epoch})")
        return dict(ok=True, pid=pid)

    def op_tracker_take(self, c: _Conn, req: dict) -> dict:
        """Lend the tracker out.  The epoch comes back "" if the agent reset
        it since (a snapshot or rollback: the count since the epoch is not
        all in it) -- unless the caller asks ``with_written`` and takes the
        spans reset here as ``written`` too."""
        pid, start = int(req["pid"]), int(req["starttime"])
        tr = self._tracker_may(c, pid)
        if tr is None or tr.starttime != start or tr.lent or not tr.held():
            if tr is not None and _starttime(pid) != tr.starttime:
                self.wt.drop(pid, "the process is gone")
            raise NoTracker(f"no tracker for pid {pid}" + (" (of a process that started at "
                            "another time)" if tr is not None and tr.starttime != start else ""))
        if tr.parts:
            # the snapshots' count up to now (no freeze needed: PAGEMAP_SCAN
            # is atomic per page, a page written meanwhile shows next time)
            tr.collect()
        epoch, written = tr.epoch or "", tr.since_epoch
        if tr.epoch_lost or (written and not req.get("with_written")):
            epoch, written = "", []
        fd = tr.lend()
        if tr.parts:
            tr.epoch, tr.since_epoch, tr.epoch_lost = None, [], False
        else:
            del self.wt.by_pid[pid]
        self.log(f"tracker of pid {pid} handed out (epoch {epoch or '-'})")
        reply = dict(ok=True, pid=pid, epoch=epoch, _fds=[fd])
        if req.get("with_written"):
            reply["written"] = [list(r) for r in written]
        return reply

    def op_tracker_drop(self, c: _Conn, req: dict) -> dict:
        pid = int(req["pid"])
        tr = self._tracker_may(c, pid)
        if tr is None or tr.epoch is None:
            return dict(ok=True, pid=pid, dropped=False)
        if tr.parts:
            tr.epoch, tr.since_epoch = None, []      # the snapshots still count with it
        else:
            self.wt.drop(pid)
        return dict(ok=True, pid=pid, dropped=True)

    def op_discard(self, c: _Conn, req: dict) -> dict:
        from linuxcr.engine import snapshots
        s = self._snap(c, req)
        snapshots.discard(s, self.wt)
        del self.snaps[s.crid]
        self.log(f"snapshot {s.crid} discarded")
        return dict(ok=True, crid=s.crid)

    def op_writeback(self, c: _Conn, req: dict) -> dict:
        from linuxcr.engine import snapshots
        s = self._snap(c, req)
        fds = c.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise AgentError("writeback needs exactly one fd to write the image to")
        try:
            res = snapshots.writeback(s, fds[0], compress=bool(req.get("compress")),
                                      name=str(req.get("name", "image")))
        finally:
            os.close(fds[0])
        return dict(ok=True, crid=s.crid, **res)

    def op_rollback(self, c: _Conn, req: dict) -> dict | None:
        from linuxcr.engine import snapshots
        s = self._snap(c, req)
        self_conn = s.extra.get("conn")
        res = snapshots.rollback(s, memory_only=bool(req.get("memory_only")), trackers=self.wt,
                                 full=bool(req.get("full")))
        why = "; ".join(f"pid {r['pid']}: {r['reason']}" for r in res["per_process"] if r["reason"])
        self.log(f"snapshot {s.crid}: pid {s.pid} rolled back in {res['seconds'] * 1e3:.1f} ms "
                 f"({res['path']}, {res['pages_copied']} pages copied, {res['pages_dropped']} dropped"
                 + (f"; full because {why}" if why else "") + ")")
        if self_conn is not None and self_conn.open:
            # it is back in the recv() of its snapshot call: that call returns again
            self._drain(self_conn)
            self_conn.send(dict(ok=True, rolled_back=True, note=req.get("note"), **s.info()))
            if self_conn is c:
                return None
        return dict(ok=True, crid=s.crid, **res)

    def _drain(self, c: _Conn) -> None:
        """Drop whatever the rolled-back process had sent since (it never did)."""
        c.buf = bytearray()
        c.sock.setblocking(False)
        try:
            while True:
                data, fds, _f, _a = socket.recv_fds(c.sock, 65536, 16)
                for fd in fds:
                    os.close(fd)
                if not data:
                    break
        except (BlockingIOError, OSError):
            pass
        c.sock.setblocking(True)


def _starttime(pid: int) -> int | None:
    from linuxcr.procfs import read_stat
    try:
        return read_stat(pid).starttime
    except (FileNotFoundError, ProcessLookupError):
        return None


def run_agent(foreground: bool = False) -> None:
    """``lcr agent``: become the agent of this user (unless one runs already)."""
    d = runtime_dir()
    _ensure_dir(d)
    lock = os.open(d / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return                      # another agent serves this user
    if not foreground:
        if os.fork():
            os._exit(0)
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        logfd = os.open(d / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(null)
        os.close(logfd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.chdir("/")
    path = d / "agent.sock"
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.umask(old)
    listener.listen(64)
    (d / "agent.pid").write_text(f"{os.getpid()}\n")
    agent = Agent(d)
    try:
        agent.serve(listener)
    finally:
        from linuxcr.engine import snapshots
        for s in list(agent.snaps.values()):
            snapshots.discard(s, agent.wt)
        agent.wt.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(lock)


# ==========================================================================
# the client

_ERRORS = {name: getattr(errors, name) for name in dir(errors)
           if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), LcrError)}
_ERRORS.update(AgentError=AgentError, SnapshotLimit=SnapshotLimit, RolledBack=RolledBack,
               NoTracker=NoTracker)


def _raise(reply: dict) -> None:
    cls = reply.get("class")
    if cls == "NotCheckpointable":
        raise NotCheckpointable(reply.get("pid", 0), reply.get("reasons") or [reply.get("error")])
    if cls == "RollbackRefused":
        from linuxcr.engine.snapshots import RollbackRefused
        raise RollbackRefused(reply.get("error", "?"), reply.get("hint"))
    raise _ERRORS.get(cls, AgentError)(reply.get("error", "agent error"), reply.get("hint"))


class Client:
    """One connection to this user's agent (started on demand)."""

    def __init__(self, start: bool = True) -> None:
        self.dir = runtime_dir()
        self.sock = self._connect(start)

    def _connect(self, start: bool) -> socket.socket:
        path = str(self.dir / "agent.sock")
        deadline = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.settimeout(None)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if not start:
                    raise AgentError(f"no lcr agent is running ({path})") from None
                if deadline is None:
                    deadline = time.monotonic() + START_TIMEOUT
                    self._start()
                elif time.monotonic() > deadline:
                    raise AgentError(f"the lcr agent did not start ({e.strerror}); see "
                                     f"{self.dir / 'agent.log'}") from None
                time.sleep(0.02)
            except PermissionError:
                s.close()
                raise PermissionDenied(f"you may not talk to the lcr agent at {path}") from None

    def _start(self) -> None:
        _ensure_dir(self.dir)
        env = dict(os.environ, LCR_AGENT_DIR=str(self.dir))
        subprocess.run([sys.executable, "-m", "linuxcr", "agent"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                       close_fds=True, check=False)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, *, fds: tuple[int, ...] = (), **args) -> dict:
        reply, got = self.call_fds(op, fds=fds, **args)
        for fd in got:
            os.close(fd)
        return reply

    def call_fds(self, op: str, *, fds: tuple[int, ...] = (), **args) -> tuple[dict, list[int]]:
        """call(), and the fds that came with the reply (the caller owns them)."""
        data = (json.dumps(dict(op=op, **args)) + "\n").encode()
        if fds:
            n = socket.send_fds(self.sock, [data], list(fds))
            if n < len(data):
                self.sock.sendall(data[n:])
        else:
            self.sock.sendall(data)
        got: list[int] = []
        try:
            reply = self._read_line(got)
            if not reply.get("ok"):
                _raise(reply)
        except BaseException:
            for fd in got:
                os.close(fd)
            raise
        return reply, got

    def _read_line(self, fds: list[int] | None = None) -> dict:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk, more, _flags, _addr = socket.recv_fds(self.sock, 65536, 4, socket.MSG_CMSG_CLOEXEC)
            if fds is not None:
                fds += more
            else:
                for fd in more:
                    os.close(fd)
            if not chunk:
                raise AgentError("the lcr agent closed the connection (did it die?)",
                                 f"see {self.dir / 'agent.log'}")
            buf += chunk
        return json.loads(buf)


def agent_pid() -> int | None:
    try:
        return int((runtime_dir() / "agent.pid").read_text())
    except (OSError, ValueError):
        return None


class Snapshot:
    """A handle on an in-memory checkpoint held by the agent."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.crid: str = info["crid"]
        self.pid: int = info["pid"]

    def __repr__(self) -> str:
        return f"<Snapshot {self.crid} of pid {self.pid}>"

    def writeback(self, out, *, compress: bool = False) -> dict:
        return writeback(self.crid, out, compress=compress)

    def rollback(self, *, memory_only: bool = False) -> dict:
        return rollback(self.crid, memory_only=memory_only)

    def discard(self) -> None:
        discard(self.crid)


def snapshot(pid: int) -> Snapshot:
    with Client() as c:
        return Snapshot(c.call("snapshot", pid=int(pid)))


def snapshots(pid: int | None = None) -> list[dict]:
    with Client() as c:
        return c.call("list", pid=pid)["snapshots"]


def writeback(crid: str, out, *, compress: bool = False) -> dict:
    from linuxcr.image.files import output_image
    with output_image(out) as (fd, name, commit):
        with Client() as c:
            res = c.call("writeback", fds=(fd,), crid=crid, compress=compress, name=name)
        commit()
    return res


def rollback(crid: str, *, memory_only: bool = False, full: bool = False) -> dict:
    """The reply tells which way memory came back: ``path`` fast | full |
    mixed (a tree), ``pages_copied``, ``pages_dropped``, and per process
    (``per_process``) the reason a full rollback was needed.  ``full``:
    rebuild the whole address space even if the fast path could be taken."""
    with Client() as c:
        return c.call("rollback", crid=crid, memory_only=memory_only, full=full)


def discard(crid: str) -> None:
    with Client() as c:
        c.call("discard", crid=crid)


def put_tracker(pid: int, starttime: int, epoch: str, fd: int,
                written: list[tuple[int, int]] | None = None) -> None:
    """Hand a dirty-page tracker's fd (a copy of it goes; ``fd`` stays
    ours) to this user's agent, which holds it while process ``pid`` (with
    that start time) lives.  Replaces the one it held for pid, if any.
    ``written``: every (start, end) span the caller collected with a reset
    since it took the tracker (take_tracker): the snapshots of the process
    keep their count with it; without it their next rollback is full."""
    args = dict(pid=int(pid), starttime=int(starttime), epoch=str(epoch))
    if written is not None:
        args["written"] = [[int(s), int(e)] for s, e in written]
    with Client() as c:
        c.call("tracker_put", fds=(fd,), **args)


def take_tracker(pid: int, starttime: int, *, with_written: bool = False):
    """The tracker the agent holds for process ``pid`` (same start time):
    (its epoch, an fd of ours), removed from the agent; None if it holds none.

    The agent resets the tracker for snapshots of the process; then the
    count since the epoch is not all in the tracker: the epoch comes back
    "" -- or, ``with_written``, kept, and the spans reset since come as a
    third item (epoch, fd, [(start, end), ...]) to count as written too."""
    try:
        c = Client(start=False)
    except AgentError:
        return None                 # no agent: no tracker
    with c:
        try:
            reply, fds = c.call_fds("tracker_take", pid=int(pid), starttime=int(starttime),
                                    with_written=with_written)
        except NoTracker:
            return None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise AgentError(f"the agent answered tracker_take with {len(fds)} fds")
    if with_written:
        return (str(reply.get("epoch", "")), fds[0],
                [(int(s), int(e)) for s, e in reply.get("written", [])])
    return str(reply.get("epoch", "")), fds[0]


def drop_tracker(pid: int) -> bool:
    """Close the tracker the agent holds for ``pid``; False if there was none."""
    try:
        c = Client(start=False)
    except AgentError:
        return False
    with c:
        return bool(c.call("tracker_drop", pid=int(pid)).get("dropped"))


def trackers(pid: int | None = None) -> list[dict]:
    """The trackers the agent holds that you may use: pid, starttime, epoch, uid, since."""
    try:
        c = Client(start=False)
    except AgentError:
        return []
    with c:
        return c.call("list", pid=pid).get("trackers", [])


class Transaction:
    """``with transaction() as t: ...`` about the calling process itself.

    ``t.rollback()`` never returns: the process goes back to the moment its
    snapshot was taken, and ``__enter__`` then raises RolledBack (so the
    ``with`` body is skipped the second time).  An exception escaping the
    body rolls back too (unless ``rollback_on_error=False``); leaving the
    body normally keeps the changes and discards the snapshot."""

    def __init__(self, *, memory_only: bool = False, rollback_on_error: bool = True) -> None:
        self.memory_only = memory_only
        self.rollback_on_error = rollback_on_error
        self.crid: str | None = None
        self._client: Client | None = None

    def __enter__(self) -> "Transaction":
        self._client = Client()
        reply = self._client.call("snapshot", pid=os.getpid())
        # a rollback brings us back right here, with another reply
        self.crid = reply["crid"]
        if reply.get("rolled_back"):
            self._end()
            raise RolledBack(f"rolled back to snapshot {self.crid}"
                             + (f": {reply['note']}" if reply.get("note") else ""))
        return self

    def rollback(self, note: str | None = None) -> None:
        assert self._client is not None and self.crid is not None
        self._client.call("rollback", crid=self.crid, memory_only=self.memory_only, note=note)
        raise AgentError("rollback returned: the agent did not bring this process back")

    def _end(self) -> None:
        if self._client is not None:
            try:
                self._client.call("discard", crid=self.crid)
            except LcrError:
                pass
            self._client.close()
            self._client = None

    def __exit__(self, et, ev, tb) -> bool:
        if et is not None and self.rollback_on_error and not issubclass(et, RolledBack):
            self.rollback(note=f"{et.__name__}: {ev}")
        self._end()
        return False


def transaction(*, memory_only: bool = False, rollback_on_error: bool = True) -> Transaction:
    return Transaction(memory_only=memory_only, rollback_on_error=rollback_on_error)
