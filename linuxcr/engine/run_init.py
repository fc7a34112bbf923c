"""The init `lcr run` puts in front of the command (like tini).

pid 1 of the new pid namespace is this small Python program, run as
``python3 -I -S -c INIT REPORT_FD CMD ARGS...`` (no site, no lcr imported:
a few MiB in every image of the tree).  It starts CMD as pid 2, forwards
SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it (a namespace's
init ignores signals from outside unless it handles them, so without an init
`kill PID` would do nothing to `lcr run -- sleep 100`), reaps every orphan,
and when CMD ends exits with CMD's status (killed by signal N: 128+N), which
ends the namespace.  A failed exec of CMD is reported through REPORT_FD (the
close-on-exec pipe `lcr run` reads) as "ERR cannot run CMD: reason".

It is checkpointed and restored with the tree like any process: restored,
it goes on forwarding and reaping.
"""
from __future__ import annotations

import os
import sys

INIT = r"""
import os, signal, sys
rep, argv = int(sys.argv[1]), sys.argv[2:]
r, w = os.pipe2(os.O_CLOEXEC)
pid = os.fork()
if pid == 0:
    os.close(r)
    os.close(rep)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(w, (e.strerror or str(e)).encode())
    os._exit(127)
os.close(w)
err = os.read(r, 4096)
os.close(r)
if err:
    os.write(rep, b"ERR cannot run " + argv[0].encode() + b": " + err + b"\n")
    os._exit(127)
os.close(rep)
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, forward)
while True:
    try:
        p, status = os.wait()
    except ChildProcessError:
        os._exit(0)
    if p == pid:
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def argv(report_fd: int, cmd: list[str]) -> list[str]:
    """What `lcr run` execs as pid 1 of the namespace."""
    return [sys.executable, "-I", "-S", "-c", INIT, str(report_fd), *cmd]


def run_here(report_fd: int, cmd: list[str]) -> None:
    """The same init without an exec (the interpreter cannot be executed
    again, e.g. after dropping privileges): never returns."""
    sys.argv = ["lcr-init", str(report_fd), *cmd]
    exec(compile(INIT, "<lcr-init>", "exec"), {"__name__": "__lcr_init__"})
    os._exit(0)


def default_log_dir() -> str:
    """Where `lcr run` without -o sends the command's output: $LCR_RUN_LOGS,
    else $XDG_STATE_HOME/lcr/runs, else ~/.local/state/lcr/runs."""
    d = os.environ.get("LCR_RUN_LOGS")
    if not d:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        d = os.path.join(base, "lcr", "runs")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d
