"""Hand `lcr checkpoint` and `lcr restart` to this user's running agent (the client side; the
agent side is agent/worker.py).  Imported by the tiny entry point
(__main__.entry) before anything else of lcr: it must stay light (os, socket,
json, signal only).

The agent forks a warm worker (every import already done) that runs the same
command line with our stdin/stdout/stderr and working directory (SCM_RIGHTS)
and our environment, and reports its exit code; we exit with it.  ^C,
SIGTERM and SIGHUP here are forwarded to the worker, which thaws the target
and exits 130/143/129 as in-process (one caught before the worker is known
goes to it once it is, or back to us if it never starts).  Our umask goes
with the request; the worker takes our resource limits from /proc.
Not handed off: when no agent runs (it is not started for this:
LCR_AGENT=start asks for that), `--no-agent`, LCR_NO_AGENT=1, `--shell-job`
(needs our terminal), `restart --wait` (the restored root must be our
child), `restart --fd N=&M` with M > 2 (an fd the worker does not get),
LCR_FAULT set (tests), or when the agent refuses before the worker started;
then the command runs in this process as before.

A restart by the worker gives the same tree: the restored root is the
worker's child, then an orphan once the worker exits, as it is of this
process once it exits; the agent serves only a client in the same cgroup
and login session (worker._context), where the tree would have been.
"""
from __future__ import annotations

import json
import os
import signal
import socket

COMMANDS = ("checkpoint", "restart")
NO_HANDOFF_FLAGS = ("--no-agent", "--shell-job", "-h", "--help")
NO_HANDOFF_RESTART = ("--wait",)
WORKER_DIED = 70          # errors.INTERNAL_ERROR (not imported: start-up time)


def agent_socket() -> str:
    """agent.sock in the agent's directory (the same rule as agent.client.runtime_dir)."""
    env = os.environ.get("LCR_AGENT_DIR")
    if env:
        return os.path.join(env, "agent.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.geteuid():
        return os.path.join(xdg, "lcr", "agent.sock")
    return f"/tmp/lcr-{os.geteuid()}/agent.sock"


def code_id() -> list[str]:
    """Which lcr this is: its package directory and interpreter."""
    import sys
    return [os.path.dirname(os.path.abspath(__file__)), os.path.realpath(sys.executable)]


def wanted(argv: list[str]) -> bool:
    """Is this command line one to hand off?"""
    if os.environ.get("LCR_NO_AGENT", "") not in ("", "0") or os.environ.get("LCR_FAULT"):
        return False          # LCR_FAULT (tests): fault points act on this process
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        return False
    if any(a in NO_HANDOFF_FLAGS for a in args):
        return False
    return args[0] != "restart" or not (any(a in NO_HANDOFF_RESTART for a in args)
                                        or _own_fds(args))


def _own_fds(args: list[str]) -> bool:
    """Does a `--fd N=&M` give the restored process an fd M > 2 of ours
    (the worker has only our stdin, stdout and stderr)?"""
    for i, a in enumerate(args):
        spec = args[i + 1] if a == "--fd" and i + 1 < len(args) else \
            a[len("--fd="):] if a.startswith("--fd=") else ""
        _n, _, what = spec.partition("=")
        if what.startswith("&") and what[1:] not in ("0", "1", "2"):
            return True
    return False


def _connect() -> socket.socket | None:
    path = agent_socket()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
    if os.environ.get("LCR_AGENT") != "start":
        return None
    try:   # opt-in: start the agent (this import costs what handing off saves, once)
        from linuxcr.agent.client import Client
        c = Client(start=True)
        return c.sock
    except Exception:
        return None


def _read_msg(s: socket.socket, buf: bytearray) -> dict | None:
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def try_handoff(argv: list[str]) -> int | None:
    """Run argv through the agent: its exit code, or None to run in-process
    (nothing was started)."""
    if not wanted(argv):
        return None
    s = _connect()
    if s is None:
        return None
    buf = bytearray()
    cwd = -1
    worker = 0
    pending: list[int] = []

    def forward(signum, _frame):      # ^C, SIGTERM, SIGHUP: the worker's to handle
        pending.append(signum)
        if worker:
            try:
                os.kill(worker, signum)
            except OSError:
                pass

    # caught from before the request: one that comes before the worker is
    # known goes to it once it is, or back to us if it never starts
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            mask = os.umask(0o22)
            os.umask(mask)
            # the agent runs only the same lcr (package directory) with the same python
            req = {"op": "run", "argv": list(argv), "env": dict(os.environ), "code": code_id(),
                   "umask": mask}
            socket.send_fds(s, [(json.dumps(req) + "\n").encode()], [0, 1, 2, cwd])
            first = _read_msg(s, buf)
        except (OSError, ValueError):
            first = None
        finally:
            if cwd >= 0:
                os.close(cwd)
        if not first or not first.get("ok") or not isinstance(first.get("worker"), int):
            s.close()
            _restore(old, pending)
            return None               # refused or an old agent: run here
        worker = first["worker"]
        for sig in dict.fromkeys(pending):
            try:
                os.kill(worker, sig)
            except OSError:
                pass
        end = _read_msg(s, buf)
    finally:
        s.close()
        _restore(old, [])
    if end is None or not isinstance(end.get("exit"), int):
        if pending:                   # it died of what we forwarded: say so as in-process
            line, code = _signalled(pending[0])
            os.write(2, f"lcr: {line}\n".encode())
            return code
        os.write(2, f"lcr: the agent's worker (pid {worker}) ended without an exit code; "
                    f"see {os.path.dirname(agent_socket())}/agent.log, or use --no-agent\n".encode())
        return WORKER_DIED
    return end["exit"]


def _restore(old: dict, pending: list[int]) -> None:
    """Our handlers back; signals caught meanwhile that nobody handled: to us again."""
    for sig, h in old.items():
        signal.signal(sig, h)
    for sig in dict.fromkeys(pending):
        signal.raise_signal(sig)


def _signalled(sig: int) -> tuple[str, int]:
    """The line and exit code of in-process lcr ended by ``sig`` (errors.Terminated)."""
    if sig == signal.SIGINT:
        return "interrupted", 130
    return f"terminated by {signal.Signals(sig).name}", 128 + sig
