"""The per-user snapshot agent: the daemon (protocol: linuxcr/agent/__init__.py).

``lcr agent`` (cli.py) runs run_agent(); Client._start (client.py) starts
it on demand as ``python3 -m linuxcr agent``.  It drives engine/snapshots.py
and holds the processes' write trackers between lcr commands.
"""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from linuxcr import errors, faults
from linuxcr.agent import recovery
from linuxcr.agent.client import ensure_dir, runtime_dir
from linuxcr.errors import AgentError, LcrError, NoTracker, NotCheckpointable, PermissionDenied, SnapshotLimit
from linuxcr.image import runs

MAX_LINE = 1 << 20
IDLE_EXIT = float(os.environ.get("LCR_AGENT_IDLE", "600"))   # seconds, with no snapshot held


def _limits() -> tuple[int, int]:
    n = int(os.environ.get("LCR_MAX_SNAPSHOTS", "16"))
    mem = os.environ.get("LCR_MAX_SNAPSHOT_MEMORY")
    if mem:
        return n, int(mem)
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    return n, total // 2


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
    def __init__(self, d: Path, lock_fd: int = -1, run_cli=None) -> None:
        self.dir = d
        self.run_cli = run_cli                # `lcr checkpoint` handed off (agent/worker.py)
        self.listener: socket.socket | None = None
        self.workers: set[int] = set()        # running workers: the agent is busy (no idle exit)
        self.lock_fd = lock_fd                # kept open by a rollback's guardian
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
        self.listener = listener
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
            if self.snaps or self.conns or self.wt.by_pid or self.workers:
                self.last_busy = time.monotonic()
            elif time.monotonic() - self.last_busy > IDLE_EXIT:
                self.log("idle: exiting")
                break

    def _close(self, c: _Conn) -> None:
        if c.open:
            self._drop_unacked(c)
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
        spec = None
        try:
            req = json.loads(line)
            op = req.get("op")
            spec = req.get("fault") if isinstance(req, dict) else None
            if spec:
                # tests: LCR_AGENT_FAULT of the client arms a fault point here,
                # for this request only (the requester owns this agent anyway)
                os.environ[faults.ENV] = str(spec)
                faults.reset()
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
            if spec:
                os.environ.pop(faults.ENV, None)
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
            if (os.WIFEXITED(st) or os.WIFSIGNALED(st)) and pid in self.workers:
                self.workers.discard(pid)
                if os.WIFSIGNALED(st):
                    self.log(f"worker {pid}: killed by signal {os.WTERMSIG(st)}")
                continue
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
            raise errors.NoSuchSnapshot(f"no snapshot {crid!r}", "lcr snapshots lists them")
        self._may(c, s.uid, f"snapshot {crid}")
        return s

    def held(self) -> int:
        return sum(s.held() for s in self.snaps.values())

    # --- operations -------------------------------------------------------
    def op_ping(self, c: _Conn, req: dict) -> dict:
        return dict(ok=True, pid=os.getpid(), snapshots=len(self.snaps))

    def op_run(self, c: _Conn, req: dict) -> None:
        """A command line handed off by the CLI (agent/worker.py): forked,
        the worker answers on this connection; we forget it."""
        from linuxcr.agent import worker
        fds = c.take_fds()
        try:
            mine = [k.fd for k in self.sel.get_map().values()] + [self.sel.fileno(), self.lock_fd]
            pid = worker.start(c.sock, c.uid, c.pid, req, fds, [fd for fd in mine if fd >= 0 and
                                                           fd != c.sock.fileno()], self.run_cli)
        finally:
            for fd in fds:
                os.close(fd)
        self.workers.add(pid)
        self.log(f"worker {pid}: {' '.join(req['argv'][1:])} (pid {c.pid})")
        self.sel.unregister(c.sock)
        self.conns.pop(c.sock.fileno(), None)
        c.open = False
        c.sock.close()
        return None

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
        rec = recovery.Record(self.dir, "snapshot", pid)
        try:
            s = snapshots.take(pid, exclude=held, trackers=self.wt)
        finally:
            rec.clear()
        s.extra["conn"] = c if c.pid == pid else None     # a process snapshotting itself
        if req.get("ack"):
            # held until the client says it got the crid; discarded if its
            # connection closes first (a killed `lcr snapshot`)
            s.extra["unacked"] = c
        self.snaps[s.crid] = s
        faults.point("snapshot.taken")
        self.log(f"snapshot {s.crid} of pid {pid} ({len(s.parts)} process(es), frozen "
                 f"{s.frozen_seconds * 1e3:.1f} ms, children {s.children()})")
        return dict(ok=True, **s.info())

    def op_ack(self, c: _Conn, req: dict) -> None:
        """The client got the crid of its snapshot: keep it.  No reply."""
        s = self.snaps.get(str(req.get("crid", "")))
        if s is not None and s.extra.get("unacked") is c:
            del s.extra["unacked"]
        return None

    def _drop_unacked(self, c: _Conn) -> None:
        from linuxcr.engine import snapshots
        for crid, s in list(self.snaps.items()):
            if s.extra.get("unacked") is c:
                snapshots.discard(s, self.wt)
                del self.snaps[crid]
                self.log(f"snapshot {crid} discarded: its client went away before it got the crid")

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
        from linuxcr.engine.snapshots import Tracked
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
                    tr.lose("an incremental checkpoint reset the write tracker")
                else:
                    tr.fold(runs.normalize([(int(a), int(b)) for a, b in written]))
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
        rec = recovery.Record(self.dir, "rollback", s.pid, crid=s.crid)
        try:
            res = snapshots.rollback(s, memory_only=bool(req.get("memory_only")), trackers=self.wt,
                                     full=bool(req.get("full")), record=rec.state,
                                     keep_fds=(self.lock_fd,) if self.lock_fd >= 0 else ())
        finally:
            rec.clear()
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


def run_agent(foreground: bool = False, run_cli=None, warm=None) -> None:
    """``lcr agent``: become the agent of this user (unless one runs already).
    ``run_cli(argv) -> exit code``: runs a handed-off command line in a worker
    (agent/worker.py); ``warm()``: imports what it will need, once listening."""
    d = runtime_dir()
    ensure_dir(d)
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
    agent = Agent(d, lock, run_cli)
    from linuxcr.engine import snapshots
    killed = snapshots.kill_orphans()
    if killed:
        agent.log(f"killed orphaned snapshot process(es) {killed} (left by an agent that died)")
    for line in recovery.sweep(d):
        agent.log(line)
    if warm is not None:
        warm()          # the workers of handed-off checkpoints fork with the API imported
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
