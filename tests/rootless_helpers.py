"""Helpers for the process-tree tests (test_e2e_tree.py) and the non-root
tests (test_rootless.py), on top of helpers.py.

- Trees: list a process's descendants, kill and reap a whole tree by pid
  (``Trees``, the registry the ``trees`` fixtures use), read NSpid, wait
  for a condition, check a pipeline's output file.
- Another user: find ``lcrtest``, run programs and ``lcr`` as that user
  (setpriv: it execs, so the pid we start is the program's pid), a work
  directory that user owns.

Timeouts are safety bounds only.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest

import helpers
from helpers import LCR, LCR_TIMEOUT, REAP_TIMEOUT, REPO, SINGLE_THREAD_ENV

# --------------------------------------------------------------------------
# process trees


def children(pid: int) -> list[int]:
    """Children of every thread of pid (empty if it is gone)."""
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """Every descendant of pid, parents before children (not pid itself)."""
    out: list[int] = []
    queue = children(pid)
    seen = set()
    while queue:
        p = queue.pop(0)
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        queue += children(p)
    return out


def tree_pids(root: int) -> list[int]:
    return [root] + descendants(root)


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def comm_of(pid: int, tid: int | None = None) -> str | None:
    path = f"/proc/{pid}/task/{tid}/comm" if tid else f"/proc/{pid}/comm"
    try:
        return Path(path).read_text().rstrip("\n")
    except (FileNotFoundError, ProcessLookupError):
        return None


def tasks_of(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def thread_names(pid: int) -> dict[int, str]:
    """tid -> comm of every thread of pid."""
    return {tid: comm_of(pid, tid) for tid in tasks_of(pid)}


def nspid(pid: int) -> list[int]:
    """NSpid of /proc/PID/status: the pid in each namespace, outermost first."""
    st = helpers.proc_status(pid)
    assert st is not None, f"pid {pid} is gone"
    return [int(x) for x in st["NSpid"].split()]


def inner_pid(pid: int) -> int:
    return nspid(pid)[-1]


def stat_ids(pid: int) -> tuple[int, int, int]:
    """(ppid, pgid, sid) from /proc/PID/stat, in the reader's pid namespace."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2:].split()
    return int(f[1]), int(f[2]), int(f[3])


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               interval: float = 0.01) -> object:
    """Poll cond() until it is truthy (returned); fail with ``what`` after
    ``timeout`` seconds (a safety bound)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_tree_running_untraced(root: int, ignore_vanished: bool = False) -> list[int]:
    """The root and every descendant: not stopped, not traced (zombies are
    allowed below the root: their parent reaps them)."""
    pids = tree_pids(root)
    for p in pids:
        st = helpers.proc_status(p)
        if st is None:
            if p == root or not ignore_vanished:
                raise AssertionError(f"pid {p} of the tree of {root} is gone")
            continue
        state = st["State"][:1]
        if p != root and state in ("Z", "X"):
            continue
        assert state not in ("t", "T", "Z", "X"), f"pid {p} (tree of {root}) is in state {st['State']}"
        assert st["TracerPid"] == "0", f"pid {p} (tree of {root}) is traced by {st['TracerPid']}"
    return pids


@dataclass
class _Root:
    pid: int
    start: int | None
    popen: subprocess.Popen | None = None


class Trees:
    """Process trees a test started or restored (and loose pids such as an
    lcr-init).  ``kill_all``: for each tree still held by the same process
    (same start time), SIGKILL the root, then every process below it
    (orphans come to the pytest process, a child subreaper), then reap them
    all by pid."""

    def __init__(self) -> None:
        self._roots: list[_Root] = []

    def add(self, pid: int, popen: subprocess.Popen | None = None) -> int:
        """``popen``: if we started it; it is reaped here by pid, so the
        Popen object must never poll (a restored process may hold its pid)."""
        self._roots.append(_Root(pid, helpers.start_time(pid), popen))
        return pid

    def kill_all(self) -> list[str]:
        problems = []
        for r in reversed(self._roots):
            try:
                if r.start is None or helpers.start_time(r.pid) != r.start:
                    _reap_if_child(r.pid)
                    continue
                kill_tree(r.pid)
            except Exception as e:  # keep going: kill the others
                problems.append(f"tree of pid {r.pid}: {e}")
            if r.popen is not None and r.popen.returncode is None:
                r.popen.returncode = -signal.SIGKILL   # reaped by pid
        self._roots.clear()
        return problems


def _reap_if_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def kill_tree(root: int, timeout: float = REAP_TIMEOUT) -> None:
    """SIGKILL root, then every process below it (some may exit meanwhile),
    then reap them all (orphans come to us, a child subreaper)."""
    pids = tree_pids(root)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in reversed(pids):
        helpers.reap(p, timeout)


def kill_tree_and_reap(pids: Iterable[int], timeout: float = REAP_TIMEOUT) -> None:
    """After a checkpoint killed a tree: wait until every one of its pids is
    gone (reaping those that are, or became, our children)."""
    for p in reversed(list(pids)):
        helpers.reap(p, timeout)


def checkpoint_tree(root: int, img: str | Path, *args, lcr_fn=None) -> list[int]:
    """``lcr checkpoint ROOT -o IMG ARGS`` (which kills the tree after a good
    dump) and wait until every process of the tree is gone, so its pids are
    free for the restart.  Returns the tree's pids (root first)."""
    pids = tree_pids(root)
    (lcr_fn or helpers.lcr)("checkpoint", root, "-o", img, *args)
    kill_tree_and_reap(pids)
    return pids


def restart_tree(img: str | Path, trees: Trees, *args, lcr_fn=None) -> tuple[int, str]:
    """``lcr restart IMG``: the root's pid (registered for teardown before
    anything is checked) and lcr's stderr."""
    cp = (lcr_fn or helpers.lcr)("restart", img, *args, check=False)
    pid = None
    if cp.returncode == 0:
        pid = helpers.parse_restored_pid(cp.stdout)
        trees.add(pid)
    assert cp.returncode == 0, f"lcr restart {img} exited {cp.returncode}:\n{cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    return pid, cp.stderr


def count_lines(path: str | Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def check_sequence(path: str | Path, fmt: str) -> int:
    """The file holds exactly fmt % 1, fmt % 2, ..., fmt % n, one per line,
    each line complete; returns n.  The first difference is reported."""
    data = Path(path).read_bytes()
    assert data.endswith(b"\n") or not data, f"{path} ends with a partial line: {data[-40:]!r}"
    lines = data.decode("ascii", "replace").splitlines()
    for i, line in enumerate(lines, 1):
        if line != fmt % i:
            ctx = lines[max(0, i - 4): i + 3]
            raise AssertionError(f"{path}: line {i} is {line!r}, want {fmt % i!r} "
                                 f"(lost, duplicated or reordered lines); around it: {ctx}")
    return len(lines)


def io_wchar(pid: int) -> int:
    """Bytes the process has written so far (/proc/PID/io wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def find_by_exe(pids: Iterable[int], exe: str | Path) -> int:
    target = os.path.realpath(exe)
    found = [p for p in pids if exe_of(p) == target]
    assert len(found) == 1, f"want one process running {target} among {list(pids)}, found {found}"
    return found[0]


# --------------------------------------------------------------------------
# another user


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def prefix(self) -> list[str]:
        """Run a command as this user: setpriv execs, so the pid stays."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home,
               "USER": self.name, "LOGNAME": self.name, "LANG": os.environ.get("LANG", "C.UTF-8"),
               "PYTHONPATH": str(REPO)}
        env.update(SINGLE_THREAD_ENV)
        for k in ("LCR_SHARED", "LCR_DEBUG", "LCR_VERBOSE"):
            if k in os.environ:
                env[k] = os.environ[k]
        if extra:
            env.update(extra)
        return env


def find_user(name: str = "lcrtest") -> User:
    """The test user, or skip."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name!r} (.ci/run creates it with useradd -m {name})")
    if os.geteuid() != 0:
        pytest.skip("the rootless tests are driven by root (to start, probe and kill as others)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found")
    return User(name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/")


def user_can_run_lcr(user: User) -> str | None:
    """None if ``user`` can run this interpreter and import linuxcr, else why not."""
    try:
        cp = subprocess.run([*user.prefix, sys.executable, "-c",
                             "import linuxcr, msgspec, click; print('ok')"],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env=user.env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {sys.executable} as {user.name}: {e}"
    if cp.returncode != 0 or "ok" not in cp.stdout:
        return (f"{user.name} cannot use {sys.executable} with linuxcr (is its directory "
                f"traversable by others?): {cp.stderr.strip()[-300:]}")
    return None


def lcr_as(user: User | None, *args, check: bool = True, input: bytes | None = None,
           timeout: float = LCR_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m linuxcr ARGS`` as ``user`` (root if None), cwd = the repo."""
    argv = [*(user.prefix if user else []), *LCR, *(str(a) for a in args)]
    env = user.env() if user else helpers.child_env({"PYTHONPATH": str(REPO)})
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                            cwd=REPO, env=env)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode("utf-8", "replace")
        raise AssertionError(f"lcr {' '.join(map(str, args))} still running after "
                             f"{timeout}s (killed); stderr:\n{err}") from None
    cp.stdout = cp.stdout.decode("utf-8", "replace")
    cp.stderr = cp.stderr.decode("utf-8", "replace")
    if check and cp.returncode != 0:
        who = user.name if user else "root"
        raise AssertionError(f"lcr {' '.join(map(str, args))} (as {who}) exited "
                             f"{cp.returncode}:\n{cp.stderr}")
    return cp


def user_workdir(user: User) -> Path:
    """A fresh directory owned by ``user`` (mode 755) under the system temp dir."""
    d = Path(tempfile.mkdtemp(prefix=f"lcr-{user.name}-"))
    os.chown(d, user.uid, user.gid)
    os.chmod(d, 0o755)
    return d


def root_or_user(request, who: str) -> tuple[User | None, Path]:
    """For a test run as root (``who`` "root") or as the ordinary user
    lcrtest (any other ``who``): (None, tmp_path) or the ``user`` and ``wd``
    fixtures (conftest.py: a work directory lcrtest owns, removed after).
    Skips when lcrtest cannot run lcr, or a root run is not run by root."""
    if who == "root":
        if os.geteuid() != 0:
            pytest.skip("root run")
        return None, request.getfixturevalue("tmp_path")
    return request.getfixturevalue("user"), request.getfixturevalue("wd")


def user_file(user: User, path: Path, content: bytes = b"") -> Path:
    path.write_bytes(content)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o644)
    return path


def start_as(user: User, argv: Iterable, log: Path, cwd: Path | None = None,
             env: dict | None = None) -> subprocess.Popen:
    """Start argv as ``user``: detached (new session), stdin /dev/null,
    stdout+stderr appended to ``log`` (made and owned by the user, so that
    the user's restart can open it again)."""
    if not log.exists():
        user_file(user, log)
    return helpers.start_detached([*user.prefix, *argv], log, env=env or user.env(), cwd=cwd)


READY_PID = r"^READY pid=(\d+)"


def wait_ready(log: Path, pid: int, pattern: str = READY_PID) -> re.Match:
    m = helpers.wait_for_line(log, pattern, helpers.READY_TIMEOUT, pid=pid)
    return m
