"""The agent's side of `lcr checkpoint` and `lcr restart` handed off by the CLI (linuxcr/handoff.py).

{"op": "run", "argv": [...], "env": {...}, "umask": N} + fds [stdin, stdout, stderr, cwd]
    -> {"ok": true, "worker": W}  then, when it is done, {"exit": N}

Only for a peer of the agent's own uid (SO_PEERCRED), with the same
groups, capabilities and namespaces (its /proc/PID/status and ns/).  The agent forks a
worker (warm: lcr is imported) that takes those fds as 0/1/2 and its
working directory, the client's environment, and runs the command line
through ``run_cli`` (given by `lcr agent`, cli.py: the agent does not import
the CLI); the agent goes on serving.  The worker gets SIGINT if the agent
dies (PR_SET_PDEATHSIG): it thaws its target and ends as on ^C; SIGTERM and
SIGHUP (forwarded by the client) end it the same way (errors.Terminated),
and so does the client's death (its connection closes: SIGHUP).
It takes the client's umask, resource limits, scheduling (policy, nice),
CPU affinity, I/O priority and oom_score_adj; one it cannot take (a hard
limit above the agent's, a nice value below it without CAP_SYS_NICE) is a
refusal: the client runs it in-process.  A client in another root
directory (chroot) is refused too: its paths are not the agent's.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from typing import Callable

from linuxcr.errors import AgentError, PermissionDenied, Terminated
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
    # the root directory: a chroot'ed client's paths lead elsewhere for us
    root = os.stat(f"/proc/{pid}/root")
    ns += ((root.st_dev, root.st_ino),)
    # a restarted tree is born in the worker's cgroup and audit session: the
    # client's must be the same (the kernel gives no way to move them after)
    extra = []
    for name in ("cgroup", "loginuid", "sessionid"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                extra.append(f.read())
        except FileNotFoundError:
            extra.append("")
    return st + ns + tuple(extra)


def _limits(pid: int) -> list[tuple[int, int]]:
    """The client's resource limits (soft, hard), in RLIMIT order."""
    import resource

    from linuxcr.procfs.limits import read_limits
    try:
        return read_limits(pid, resource.RLIM_INFINITY)
    except (OSError, ValueError):
        raise PermissionDenied(f"cannot read the resource limits of pid {pid}",
                               "it runs in-process") from None


def _sched(pid: int) -> dict:
    """The client's scheduling, I/O priority, affinity and oom_score_adj:
    `nice -n 19 lcr checkpoint`, `ionice -c3`, `taskset` or `chrt -i` on
    the command hold for the worker that does it, and `lcr check`
    compares nice values and oom_score_adj with the worker's."""
    from linuxcr.procfs import read_oom_score_adj
    from linuxcr.resources import sched
    try:
        return dict(sched.of_caller(pid), oom=read_oom_score_adj(pid))
    except (OSError, ValueError):
        raise PermissionDenied(f"cannot read the scheduling of pid {pid}",
                               "it runs in-process") from None


def _apply_sched(want: dict) -> str:
    """In the worker: the client's scheduling and oom_score_adj instead of
    the agent's.  What could not be taken, or ""."""
    from linuxcr.resources import procattrs, sched
    refused = sched.take(want)
    if not refused:
        try:
            procattrs.set_oom_score_adj(os.getpid(), want["oom"])
        except OSError as e:
            refused = f"oom_score_adj: {e.strerror or e}"
    return f"the lcr agent cannot take the client's {refused}" if refused else ""


def _apply_limits(limits: list[tuple[int, int]]) -> str:
    """In the worker: the client's resource limits instead of the agent's
    (lowering any is allowed; raising a hard one needs CAP_SYS_RESOURCE).
    What could not be applied, or ""."""
    import resource
    for res, lim in enumerate(limits):
        try:
            if resource.getrlimit(res) != lim:
                resource.setrlimit(res, lim)
        except (OSError, ValueError) as e:
            return (f"the lcr agent cannot take the client's resource limit {res} "
                    f"({lim[0]}, {lim[1]}): {getattr(e, 'strerror', None) or e}")
    return ""


def _watch_client(sock: socket.socket) -> None:
    """The client killed (even by SIGKILL: its end of the connection
    closes): SIGHUP to ourselves, so the command ends as in-process lcr
    would have -- nothing done to the target, which is thawed (the
    in-process command would have died; its guardian put the target back)
    -- instead of running on for nobody.  A thread: the main one runs it."""
    import select
    import threading

    def watch() -> None:
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
        while True:
            try:
                p.poll()
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return          # the client never writes again: not ours to judge
            except BlockingIOError:
                continue
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGHUP)
            return
    threading.Thread(target=watch, name="lcr-client-watch", daemon=True).start()


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
    argv, env, umask = req.get("argv"), req.get("env"), req.get("umask")
    if (not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)
            or not isinstance(env, dict) or len(fds) != 4
            or not isinstance(umask, int) or not 0 <= umask <= 0o777):
        raise AgentError("malformed run request")
    limits = _limits(peer_pid)
    sched = _sched(peer_pid)
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
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)       # as Python starts: EPIPE
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # SIGTERM/SIGHUP forwarded by the client: as in-process (cli.checkpoint
        # arms the same), from the first instant: cleanup as on ^C, 143/129
        Terminated.arm()
        os.umask(umask)               # the client's: the image and files made have its modes
        refused = _apply_limits(limits) or _apply_sched(sched)
        if refused:                   # e.g. a higher hard limit than ours: the client runs it
            sock.setblocking(True)
            sock.sendall((json.dumps({"ok": False, "error": refused, "class": "PermissionDenied",
                                      "hint": "it runs in-process"}) + "\n").encode())
            os._exit(0)
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
        _watch_client(sock)
        try:
            code = run_cli(list(argv))
        except Terminated as e:
            sys.stderr.write(f"lcr: {e.message}\n")
            code = e.exit_code
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
        # never back into the agent's code: a signal now (the client gone
        # once it has its exit code, the agent dying) is too late to matter
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            try:
                sock.sendall((json.dumps({"exit": code}) + "\n").encode())
            except Exception:
                pass
        finally:
            os._exit(code & 0xFF)
