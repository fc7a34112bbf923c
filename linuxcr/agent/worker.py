"""The agent's side of `lcr checkpoint` handed off by the CLI (linuxcr/handoff.py).

{"op": "run", "argv": [...], "env": {...}} + fds [stdin, stdout, stderr, cwd]
    -> {"ok": true, "worker": W}  then, when it is done, {"exit": N}

Only for a peer of the agent's own uid (SO_PEERCRED), with the same
groups, capabilities and namespaces (its /proc/PID/status and ns/).  The agent forks a
worker (warm: lcr is imported) that takes those fds as 0/1/2 and its
working directory, the client's environment, and runs the command line
through ``run_cli`` (given by `lcr agent`, cli.py: the agent does not import
the CLI); the agent goes on serving.  The worker gets SIGINT if the agent
dies (PR_SET_PDEATHSIG): it thaws its target and ends as on ^C.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from typing import Callable

from linuxcr.errors import AgentError, PermissionDenied
from linuxcr.procfs import read_status
from linuxcr.sys.syscalls import prctl

PR_SET_PDEATHSIG = 1
_KEEP: list = []


def _stream(fd: int, mode: str) -> io.TextIOWrapper:
    tty = os.isatty(fd)
    return open(fd, mode, buffering=1 if tty and mode == "w" else -1, closefd=False,
                errors="backslashreplace" if fd == 2 else "strict")


def _context(pid: int | str) -> tuple:
    """What a worker must share with its client: credentials, capabilities
    and namespaces (a worker of the same uid with more groups or
    capabilities, or other mounts, would not be the same command)."""
    s = read_status(pid)
    st = (s.uid, s.gid, s.groups, s.cap_inh, s.cap_prm, s.cap_eff, s.cap_bnd, s.no_new_privs,
          s.seccomp)
    ns = tuple(os.readlink(f"/proc/{pid}/ns/{n}") for n in ("mnt", "pid", "user", "net", "ipc", "uts"))
    return st + ns


def start(sock: socket.socket, peer_uid: int, peer_pid: int, req: dict, fds: list[int], close_in_child: list[int],
          run_cli: Callable[[list[str]], int] | None) -> int:
    """Fork the worker for this request; its pid.  ``close_in_child``: the
    agent's own fds (listener, other connections, lock) the worker drops."""
    if run_cli is None:
        raise AgentError("this agent does not run commands (started by an older lcr?)")
    if peer_uid != os.getuid():
        raise PermissionDenied(f"uid {peer_uid} may not run commands in the lcr agent of uid "
                               f"{os.getuid()}", "run lcr as yourself; it runs in-process then")
    try:
        same = _context(peer_pid) == _context("self")
    except OSError:
        same = False
    if not same:
        raise PermissionDenied(f"pid {peer_pid} has other groups, capabilities or namespaces than "
                               f"the lcr agent", "it runs in-process")
    import linuxcr
    mine = [os.path.dirname(os.path.abspath(linuxcr.__file__)), os.path.realpath(sys.executable)]
    if req.get("code") != mine:     # handoff.code_id of the client
        raise AgentError(f"the lcr agent runs other code ({' '.join(mine)})", "it runs in-process")
    argv, env = req.get("argv"), req.get("env")
    if (not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)
            or not isinstance(env, dict) or len(fds) != 4):
        raise AgentError("malformed run request")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        for fd in close_in_child:
            try:
                os.close(fd)
            except OSError:
                pass
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)       # as Python starts: EPIPE
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for i in range(3):
            os.dup2(fds[i], i)
        os.fchdir(fds[3])
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        # the agent's streams own fds 0-2 (closefd): kept, or collecting them closes ours
        _KEEP.extend((sys.stdin, sys.stdout, sys.stderr))
        sys.stdin, sys.stdout, sys.stderr = _stream(0, "r"), _stream(1, "w"), _stream(2, "w")
        sys.argv = list(argv)
        sock.setblocking(True)
        sock.sendall((json.dumps({"ok": True, "worker": os.getpid()}) + "\n").encode())
        try:
            code = run_cli(list(argv))
        except KeyboardInterrupt:
            sys.stderr.write("lcr: interrupted\n")
            code = 130
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:     # a bug of ours: one line for the client (stderr may be it)
        try:
            sys.stderr.write(f"lcr: internal error in the agent's worker: {type(e).__name__}: {e}\n")
        except Exception:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            sock.sendall((json.dumps({"exit": code}) + "\n").encode())
        except Exception:
            pass
        os._exit(code & 0xFF)
