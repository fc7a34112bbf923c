"""The client of the per-user snapshot agent (protocol: linuxcr/agent/__init__.py).

What api.py and applications call: Client (one connection, starting the
agent on demand), snapshot/rollback/writeback/discard, the dirty-page
tracker hand-over (put_tracker, take_tracker, drop_tracker, trackers), and
Snapshot/Transaction.  It imports nothing of the engine: errors come back
by class name, and every class is in errors.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from linuxcr import errors, faults
from linuxcr.errors import AgentError, LcrError, NoTracker, NotCheckpointable, PermissionDenied, RolledBack

START_TIMEOUT = 15.0
RESTART_EVERY = 0.5
FAULT_ENV = "LCR_AGENT_FAULT"     # tests: a LCR_FAULT spec armed in the agent for each request


def runtime_dir() -> Path:
    env = os.environ.get("LCR_AGENT_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.geteuid():
        return Path(xdg) / "lcr"
    return Path(f"/tmp/lcr-{os.geteuid()}")


def ensure_dir(d: Path) -> None:
    try:
        d.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = d.lstat()
    if not d.is_dir() or d.is_symlink() or st.st_uid != os.geteuid():
        raise AgentError(f"{d} is not a directory of ours", "remove it or set LCR_AGENT_DIR")


# every error class is in errors.py: the agent's replies name one of them
_ERRORS = {name: getattr(errors, name) for name in dir(errors)
           if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), LcrError)}


def _raise(reply: dict) -> None:
    cls = reply.get("class")
    if cls == "NotCheckpointable":
        raise NotCheckpointable(reply.get("pid", 0), reply.get("reasons") or [reply.get("error")])
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
                now = time.monotonic()
                if deadline is None:
                    deadline, again = now + START_TIMEOUT, now + RESTART_EVERY
                    self._start()
                elif now > deadline:
                    raise AgentError(f"the lcr agent did not start ({e.strerror}); see "
                                     f"{self.dir / 'agent.log'}") from None
                elif now > again:
                    # the lock was held: by an agent on its way out, or by the
                    # guardian of a dead one finishing a rollback; try again
                    again = now + RESTART_EVERY
                    self._start()
                time.sleep(0.02)
            except PermissionError:
                s.close()
                raise PermissionDenied(f"you may not talk to the lcr agent at {path}") from None

    def _start(self) -> None:
        ensure_dir(self.dir)
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
        """call(), and the fds that came with the reply (the caller owns them).

        A snapshot is acknowledged once its reply (the crid) is read: the
        agent discards a snapshot whose client went away before that."""
        if os.environ.get(FAULT_ENV):
            args["fault"] = os.environ[FAULT_ENV]
        if op == "snapshot":
            args["ack"] = True
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
            if op == "snapshot" and reply.get("crid"):
                faults.point("snapshot.reply")
                self.sock.sendall((json.dumps(dict(op="ack", crid=reply["crid"])) + "\n").encode())
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


def recovery_notes(pid: int) -> list[str]:
    """What a dead agent (and its dead guardian) left pid in, if anything
    (agent/recovery.py): for ``lcr check``."""
    from linuxcr.agent import recovery
    return recovery.notes(runtime_dir(), int(pid))


def agent_pid() -> int | None:
    try:
        return int((runtime_dir() / "agent.pid").read_text())
    except (OSError, ValueError):
        return None


class Snapshot:
    """A handle on an in-memory checkpoint held by the agent.

    As a context manager it is discarded on exit; with
    ``rollback_on_error`` (snapshot(pid).rolling_back()) an exception
    leaving the block first rolls the process back to it.
    """

    def __init__(self, info: dict, rollback_on_error: bool = False) -> None:
        self.info = info
        self.crid: str = info["crid"]
        self.pid: int = info["pid"]
        self.rollback_on_error = rollback_on_error

    def rolling_back(self) -> "Snapshot":
        """``with linuxcr.snapshot(pid).rolling_back(): ...``: roll back on an exception."""
        self.rollback_on_error = True
        return self

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, et, ev, tb) -> None:
        try:
            if et is not None and self.rollback_on_error:
                rollback(self.crid)
        finally:
            try:
                discard(self.crid)
            except LcrError:
                if et is None:
                    raise

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


def writeback(crid: str, out, *, compress: bool = False, overwrite: bool = True) -> dict:
    from linuxcr.image.files import output_image
    with output_image(out, overwrite=overwrite) as (fd, name, commit):
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
