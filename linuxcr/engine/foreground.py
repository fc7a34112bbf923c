"""`lcr restart --wait` and `--shell-job`: lcr stays in the foreground after
the restore, like `criu restore` without -d and `dmtcp_restart`.

--wait: SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 sent to lcr are
forwarded to the restored root; lcr exits with the root's exit status (a
root killed by signal N: lcr kills itself with N, or exits 128+N).

--shell-job: the restored job gets the terminal lcr runs on, in the
foreground (tcsetpgrp).  Job control works through lcr, which is the job
the shell knows: ^Z stops the restored job -> lcr takes the terminal back
and stops itself (the shell prints "Stopped"); `fg` continues lcr -> lcr
gives the terminal to the job again and continues it; ^C reaches the job
(the foreground group) directly.

The root's status can be waited for only if it is lcr's child: a restart
in lcr's pid namespace (root) or of an `lcr run` image (its namespace init);
the cli makes lcr a child subreaper before restoring, so the latter's init
comes to lcr when the helper that made it exits.  A root restored under an
init of lcr's own (a new pid namespace with the saved pid inside) is
waited for through a pidfd; its exit status is not visible then (exit 0).
"""
from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass

from linuxcr.sys.syscalls import pidfd_open, prctl

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of the restore (an `lcr run` image's init) come to lcr."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


@dataclass
class Outcome:
    code: int            # what lcr should exit with
    signal: int = 0      # the root was killed by this signal
    note: str = ""       # one line for stderr, or ""


def _is_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def _outcome(status: int) -> Outcome:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return Outcome(128 + sig, sig)
    return Outcome(os.WEXITSTATUS(status))


def wait(pid: int, *, tty: int | None = None) -> Outcome:
    """Stay until the restored root ``pid`` ends; ``tty``: an fd of the
    terminal to run it on in the foreground (--shell-job)."""
    old = {s: signal.getsignal(s) for s in FORWARDED}
    for s in FORWARDED:
        signal.signal(s, lambda sig, _f: _forward(pid, sig))
    try:
        if not _is_child(pid):
            return _wait_foreign(pid)
        if tty is None:
            return _wait_child(pid)
        return _job(pid, tty)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_child(pid: int) -> Outcome:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return Outcome(0, note=f"pid {pid} was reaped by someone else: exit status unknown")
        return _outcome(status)


def _wait_foreign(pid: int) -> Outcome:
    try:
        pfd = pidfd_open(pid)
    except OSError:
        return Outcome(0, note=f"pid {pid} had already ended: exit status unknown")
    try:
        while True:
            try:
                if select.select([pfd], [], [])[0]:
                    break
            except InterruptedError:
                continue
    finally:
        os.close(pfd)
    return Outcome(0, note=f"pid {pid} ended; its exit status is not visible from here "
                           "(it ran under an init in a new pid namespace)")


def _job(pid: int, tty: int) -> Outcome:
    """The restored job in the foreground of tty, with job control through lcr."""
    for s in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
        signal.signal(s, signal.SIG_IGN)     # lcr is in the background meanwhile
    me = os.getpgrp()
    try:
        job = os.getpgid(pid)
    except ProcessLookupError:
        job = pid
    _fg(tty, job)
    _cont(job)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, os.WUNTRACED)
            except InterruptedError:
                continue
            except ChildProcessError:
                return Outcome(0, note=f"pid {pid} was reaped by someone else: exit status unknown")
            if not os.WIFSTOPPED(status):
                return _outcome(status)
            if os.WSTOPSIG(status) in (signal.SIGTTOU, signal.SIGTTIN) and _fg_is(tty, job):
                _cont(job)           # it tried the terminal before it was given it
                continue
            # ^Z (or a stop): the shell must see its job (lcr) stopped
            _fg(tty, me)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(0, signal.SIGSTOP)     # our own group: the shell's job
            # `fg`: continued
            _fg(tty, job)
            _cont(job)
    finally:
        _fg(tty, me)


def _fg(tty: int, pgrp: int) -> None:
    try:
        os.tcsetpgrp(tty, pgrp)
    except OSError:
        pass


def _fg_is(tty: int, pgrp: int) -> bool:
    try:
        return os.tcgetpgrp(tty) == pgrp
    except OSError:
        return False


def _cont(pgrp: int) -> None:
    try:
        os.killpg(pgrp, signal.SIGCONT)
    except ProcessLookupError:
        pass


def shell_tty() -> int | None:
    """An fd of the terminal lcr runs on (None: not on a terminal)."""
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return os.open(os.ttyname(fd), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    return None


def die_like(o: Outcome) -> int:
    """lcr's own end: the root's signal re-raised, else its exit code."""
    if o.signal and o.signal not in (signal.SIGSTOP, signal.SIGKILL):
        signal.signal(o.signal, signal.SIG_DFL)
        os.kill(os.getpid(), o.signal)
    return o.code
