"""Shared helpers for the end-to-end tests: build the test programs, start
them detached, probe them, run the ``lcr`` CLI, and make sure every process
a test started (or restored) is killed and reaped, by pid.

The test programs (tests/progs) print ``READY pid=P`` once set up and, on
SIGUSR1, check all of their state and print one line ``PASS <name> ...`` or
``FAIL <name>: <details>``; every such line carries ``pid=P``.  memhog and
pyhog (shared/workloads) answer SIGUSR1 with
``pid=P counter=N expected=X actual=Y OK|MISMATCH``.  Probes match the
first answer after the signal whatever its pid= (see assert_pass).

Timeouts here are safety bounds only, never performance assertions.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PROGS_DIR = TESTS / "progs"

# safety bounds (seconds)
READY_TIMEOUT = 60.0
PROBE_TIMEOUT = 30.0
LCR_TIMEOUT = 120.0
REAP_TIMEOUT = 15.0

LCR = [sys.executable, "-m", "linuxcr"]

CFLAGS = ["-O1", "-g", "-Wall", "-pthread"]

PASSFAIL = r"^(PASS|FAIL)\b"

# BLAS libraries start worker threads at import unless told not to: keep
# the numpy programs (pyhog, pynumpy) single-threaded, as they are meant to
# be (threads.c is the multi-threaded case).
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1"}


def shared_dir() -> Path:
    env = os.environ.get("LCR_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SINGLE_THREAD_ENV)
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------
# the pytest process as a child subreaper

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans below us (restored processes, whose parent lcr exits) are
    re-parented to this process, so they can be waited for and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


def reap_zombie_children() -> None:
    """Reap whatever children of ours have exited (end of session)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --------------------------------------------------------------------------
# /proc facts

def proc_status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def proc_state(pid: int) -> str | None:
    st = proc_status(pid)
    return st["State"][:1] if st else None


def start_time(pid: int) -> int | None:
    """Start time in clock ticks (field 22 of /proc/PID/stat): with the pid
    it identifies one process even when pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def ns_inode(pid: int | str, kind: str) -> int:
    """The inode of pid's namespace of ``kind`` ("net", "uts", ...; pid "self": ours)."""
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def map_starts(pid: int) -> set[int]:
    """Start addresses of pid's mappings (/proc/PID/maps)."""
    with open(f"/proc/{pid}/maps") as f:
        return {int(line.split("-", 1)[0], 16) for line in f}


@contextlib.contextmanager
def seized_blank(procs: "Procs", tmp_path: Path):
    """A ``sleep 300`` held as lcr holds a blank it restores into: seized,
    stopped, its syscall instruction found in the vDSO, a trampoline mapped
    at a free address (so Tracee.batch_at is set).  Yields (tracee,
    trampoline address); detached after (the sleep is killed by procs)."""
    from linuxcr.remote.task import Tracee
    from linuxcr.resources import memory
    p = procs.start(["sleep", "300"], tmp_path / "sleep.log")
    t = Tracee(p.pid, exitkill=True)
    t.seize()
    try:
        t.stop()
        vdso = next((m.start, m.end) for m in memory.read_maps(p.pid) if m.path == "[vdso]")
        t.insn = t.find_syscall_insn(vdso)
        at = memory.free_gap([], p.pid)
        memory.map_trampoline(t, at)
        yield t, at
    finally:
        t.detach()


@contextlib.contextmanager
def counting_resumes():
    """Every ptrace.cont lcr makes meanwhile: yields the list of pids it
    resumed (one entry a resume)."""
    from linuxcr.sys import ptrace
    conts: list[int] = []
    cont = ptrace.cont
    ptrace.cont = lambda pid, sig: (conts.append(pid), cont(pid, sig))[1]
    try:
        yield conts
    finally:
        ptrace.cont = cont


def damage(path: Path, data) -> None:
    """Damage the file at ``path`` as hypothesis ``data`` (st.data()) draws:
    one byte flipped (xor 1..255), or the file cut short."""
    from hypothesis import strategies as st
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(bytes(raw))


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def assert_running_untraced(pid: int) -> None:
    """Running (not stopped, not a zombie) and no tracer attached."""
    st = proc_status(pid)
    assert st is not None, f"pid {pid} is gone"
    state = st["State"][:1]
    assert state not in ("t", "T", "Z", "X"), f"pid {pid} is in state {st['State']}"
    assert st["TracerPid"] == "0", f"pid {pid} is still traced by {st['TracerPid']}"


def wait_state(pid: int, states: str, timeout: float = 10.0) -> str:
    """Wait until /proc/PID/status State is one of ``states`` (e.g. "S")."""
    deadline = time.monotonic() + timeout
    while True:
        s = proc_state(pid)
        if s is not None and s in states:
            return s
        if s is None or time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} never reached state {states!r} (is {s})")
        time.sleep(0.002)


def free_pid() -> int:
    """A pid no process has right now."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 300, -1):
        if not exists(pid):
            return pid
    raise RuntimeError("no free pid")


def pids_with_exe(path: str | Path) -> set[int]:
    target = os.path.realpath(path)
    found = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/exe") == target:
                    found.add(int(d))
            except OSError:
                pass
    return found


def live_children(parent: int | None = None) -> set[int]:
    """Pids of the non-zombie children of ``parent`` (default: us)."""
    parent = os.getpid() if parent is None else parent
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_status(int(d))
            if st and st.get("PPid") == str(parent) and st["State"][:1] not in "ZX":
                kids.add(int(d))
    return kids


# --------------------------------------------------------------------------
# killing and reaping

def reap(pid: int, timeout: float = REAP_TIMEOUT) -> int | None:
    """Wait until ``pid`` is gone from /proc: waitpid() it if it is our child
    (it may become one when re-parented to us), else poll.  Returns the wait
    status if we reaped it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r, status = os.waitpid(pid, os.WNOHANG)
            if r == pid:
                return status
        except ChildProcessError:
            if not exists(pid):
                return None
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still exists after {timeout}s "
                                 f"(state {proc_state(pid)})")
        time.sleep(0.005)


def kill_and_reap(pid: int, timeout: float = REAP_TIMEOUT) -> int | None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return reap(pid, timeout)


@dataclass
class _Tracked:
    pid: int
    start: int | None
    popen: subprocess.Popen | None = None


class Procs:
    """Every process a test started or restored.  ``kill_all`` (fixture
    teardown) SIGKILLs and reaps each one by pid -- only if the pid still
    names the same process (same start time)."""

    def __init__(self) -> None:
        self._tracked: list[_Tracked] = []

    def start(self, argv: Iterable, log: str | Path, env: dict | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        p = start_detached(argv, log, env=env, cwd=cwd)
        self._tracked.append(_Tracked(p.pid, start_time(p.pid), p))
        return p

    def add(self, pid: int) -> int:
        self._tracked.append(_Tracked(pid, start_time(pid)))
        return pid

    @property
    def pids(self) -> list[int]:
        return [t.pid for t in self._tracked]

    def kill_all(self) -> list[str]:
        problems = []
        for t in reversed(self._tracked):
            try:
                if t.start is not None and start_time(t.pid) == t.start:
                    kill_and_reap(t.pid)
                elif t.popen is not None and t.popen.returncode is None:
                    # our child, gone or replaced: reap it if it is a zombie
                    try:
                        os.waitpid(t.pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
            except Exception as e:  # keep going: kill the others
                problems.append(f"pid {t.pid}: {e}")
            if t.popen is not None and t.popen.returncode is None:
                t.popen.returncode = -signal.SIGKILL   # reaped by pid above
        self._tracked.clear()
        return problems


# --------------------------------------------------------------------------
# starting programs and reading their logs

def start_detached(argv: Iterable, log: str | Path, env: dict | None = None,
                   cwd: str | Path | None = None) -> subprocess.Popen:
    """stdin /dev/null, stdout+stderr appended to ``log`` (a regular file:
    pipes are not supported yet), a new session, no other fds."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            env=env if env is not None else child_env(), cwd=cwd)


def read_log(log: str | Path, start: int = 0) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", "replace")


def log_size(log: str | Path) -> int:
    return os.path.getsize(log)


def _tail(log: str | Path, n: int = 15) -> str:
    try:
        return "\n".join(read_log(log).splitlines()[-n:])
    except OSError as e:
        return f"(cannot read {log}: {e})"


def wait_for_line(log: str | Path, pattern: str, timeout: float = READY_TIMEOUT,
                  start: int = 0, pid: int | None = None) -> re.Match:
    """First complete line of ``log`` (from byte ``start``) matching
    ``pattern`` (re.search).  If ``pid`` is given, fail early when it dies."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        dead = pid is not None and not alive(pid)
        text = read_log(log, start)
        for line in text[: text.rfind("\n") + 1].splitlines():
            m = rx.search(line)
            if m:
                return m
        if dead:
            raise AssertionError(f"pid {pid} died (state {proc_state(pid)}) before "
                                 f"printing {pattern!r}; log {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in {log} within "
                                 f"{timeout}s; log tail:\n{_tail(log)}")
        time.sleep(0.01)


def probe(pid: int, log: str | Path, pattern: str = PASSFAIL,
          timeout: float = PROBE_TIMEOUT, sig: int = signal.SIGUSR1) -> re.Match:
    """Send ``sig`` (SIGUSR1) and wait for the answer: a new line matching ``pattern``."""
    start = log_size(log)
    os.kill(pid, sig)
    return wait_for_line(log, pattern, timeout, start=start, pid=pid)


def assert_pass(pid: int, log: str | Path, name: str,
                timeout: float = PROBE_TIMEOUT) -> re.Match:
    """Probe a tests/progs program; its answer must be PASS.

    The answer is the first PASS/FAIL line after the signal, whatever pid=
    it shows: only the signalled process answers (two processes may share
    a log), and a process restored into a new pid namespace prints the pid
    it sees, not the one we signal."""
    m = probe(pid, log, rf"^(PASS|FAIL) {re.escape(name)}\b", timeout)
    assert m.group(1) == "PASS", f"probe of {name} pid {pid}: {m.string}"
    return m


def pass_field(m: re.Match, key: str) -> int:
    """An integer ``key=N`` from a PASS line."""
    f = re.search(rf"\b{key}=(\d+)", m.string)
    assert f, f"no {key}= in {m.string!r}"
    return int(f.group(1))


@dataclass
class HogProbe:
    counter: int
    ok: bool
    line: str


def probe_hog(pid: int, log: str | Path, timeout: float = PROBE_TIMEOUT) -> HogProbe:
    """memhog/pyhog: SIGUSR1 -> 'pid=P counter=N expected=X actual=Y OK|MISMATCH'
    (P: the pid it sees; see assert_pass)."""
    m = probe(pid, log, r"\bpid=\d+ counter=(\d+) expected=(\w+) actual=(\w+) "
                        r"(OK|MISMATCH)\b", timeout)
    return HogProbe(int(m.group(1)), m.group(4) == "OK", m.string)


def last_heartbeat(log: str | Path) -> int:
    """sleeper: the highest 'HB n=N' so far (0 if none)."""
    ns = [int(x) for x in re.findall(r"^HB n=(\d+)", read_log(log), re.M)]
    return max(ns, default=0)


def wait_heartbeat_after(log: str | Path, n: int, pid: int,
                         timeout: float = PROBE_TIMEOUT) -> int:
    """sleeper: wait for a heartbeat numbered above ``n``."""
    deadline = time.monotonic() + timeout
    while True:
        last = last_heartbeat(log)
        if last > n:
            return last
        if not alive(pid) or time.monotonic() > deadline:
            raise AssertionError(f"sleeper pid {pid}: no heartbeat after n={n} "
                                 f"(alive={alive(pid)}); log tail:\n{_tail(log)}")
        time.sleep(0.01)


# --------------------------------------------------------------------------
# the lcr CLI

def as_user(uid: int | None) -> list[str]:
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def lcr(*args, input: bytes | None = None, check: bool = True,
        timeout: float = LCR_TIMEOUT, binary: bool = False, user: int | None = None,
        cwd: str | Path | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """Run ``python -m linuxcr ARGS``.  stdout is text unless ``binary``;
    stderr is always text.  ``check``: a non-zero exit fails the test."""
    argv = [*as_user(user), *LCR, *(str(a) for a in args)]
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                            cwd=cwd, env=env)
    except subprocess.TimeoutExpired as e:   # run() killed it
        err = (e.stderr or b"").decode("utf-8", "replace")
        raise AssertionError(f"lcr {' '.join(map(str, args))} still running after "
                             f"{timeout}s (killed); stderr:\n{err}") from None
    cp.stderr = cp.stderr.decode("utf-8", "replace")
    if not binary:
        cp.stdout = cp.stdout.decode("utf-8", "replace")
    if check and cp.returncode != 0:
        raise AssertionError(f"lcr {' '.join(map(str, args))} exited {cp.returncode}:\n"
                             f"{cp.stderr}")
    return cp


# Fallback when the interpreter's own files are not readable by another user
# (e.g. a pyenv under /root): import all of linuxcr as root, then drop to that
# user for good (no capabilities left) and run the CLI.
DROP_AND_RUN = """
import importlib, os, pkgutil, sys
import difflib, gettext   # imported lazily by click (e.g. on every short option)
import linuxcr, linuxcr.cli
for m in pkgutil.walk_packages(linuxcr.__path__, "linuxcr."):
    importlib.import_module(m.name)
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
sys.argv = ["lcr", *sys.argv[2:]]
linuxcr.cli.main()
"""


def lcr_as(uid: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run lcr as ``uid``: ``setpriv ... python -m linuxcr`` when that user
    can import linuxcr and its dependencies, else DROP_AND_RUN."""
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO)}
    usable = subprocess.run([*as_user(uid), sys.executable, "-c", "import linuxcr.cli"],
                            capture_output=True, cwd=cwd, env=env, timeout=60)
    if usable.returncode == 0:
        return lcr(*args, check=False, user=uid, cwd=cwd, env=env)
    argv = [sys.executable, "-c", DROP_AND_RUN, str(uid), *map(str, args)]
    cp = subprocess.run(argv, capture_output=True, cwd=cwd, env=env, timeout=LCR_TIMEOUT)
    cp.stdout, cp.stderr = cp.stdout.decode(), cp.stderr.decode()
    return cp


def parse_restored_pid(stdout: str | bytes) -> int:
    """``lcr restart`` prints the restored pid and nothing else."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode("utf-8", "replace")
    m = re.fullmatch(r"(\d+)\n?", stdout)
    assert m, f"lcr restart should print one pid on stdout, printed {stdout!r}"
    return int(m.group(1))


def restart_image(img: str | Path, procs: Procs, *args) -> int:
    """``lcr restart IMG ARGS``; the restored process is registered for
    teardown before anything is checked."""
    cp = lcr("restart", img, *args, check=False)
    pid = None
    if cp.returncode == 0:
        pid = parse_restored_pid(cp.stdout)
        procs.add(pid)
    assert cp.returncode == 0, f"lcr restart {img} exited {cp.returncode}:\n{cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    return pid


def checkpoint_kill_restart(pid: int, img: str | Path, procs: Procs,
                            ckpt_args: Iterable = (), restart_args: Iterable = ()) -> int:
    """Checkpoint (which kills the process after a good dump), wait until the
    original is gone (reap it if it is our child), restart; the new pid."""
    lcr("checkpoint", pid, "-o", img, *ckpt_args)
    reap(pid)
    return restart_image(img, procs, *restart_args)


# --------------------------------------------------------------------------
# errors from lcr

_errors_mod = None


def error_exit_code(name: str) -> int:
    """Exit code of ``linuxcr.errors.<name>`` (errors.py loaded on its own,
    so a broken package __init__ does not hide the contract)."""
    global _errors_mod
    if _errors_mod is None:
        spec = importlib.util.spec_from_file_location("_lcr_errors", REPO / "linuxcr" / "errors.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _errors_mod = mod
    return getattr(_errors_mod, name).exit_code


def assert_clean_error(cp: subprocess.CompletedProcess, error: str | None = None,
                       mentions: Iterable[str] = (), match: str | None = None,
                       empty_stdout: bool = False) -> str:
    """A user error: non-zero exit (the code of ``linuxcr.errors.<error>`` if
    given), exactly one line on stderr, no traceback, the line mentions each
    of ``mentions`` (case-insensitive) and matches ``match`` (regex, I)."""
    err = cp.stderr if isinstance(cp.stderr, str) else cp.stderr.decode("utf-8", "replace")
    assert cp.returncode != 0, f"expected an error, lcr exited 0; stderr: {err!r}"
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    for word in mentions:
        assert str(word).lower() in line.lower(), f"error line does not mention {word!r}: {line!r}"
    if match:
        assert re.search(match, line, re.I), f"error line does not match {match!r}: {line!r}"
    if error:
        want = error_exit_code(error)
        assert cp.returncode == want, (f"exit code {cp.returncode}, want {want} "
                                       f"({error}); stderr: {line!r}")
    if empty_stdout:
        out = cp.stdout if isinstance(cp.stdout, (str, bytes)) else ""
        assert not out.strip(), f"nothing should be on stdout, got {out!r}"
    return line


# --------------------------------------------------------------------------
# building the programs

@dataclass
class Bins:
    dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        if name in self.errors:
            pytest.fail(f"{name} did not compile:\n{self.errors[name]}")
        if name in self.missing:
            pytest.skip(self.missing[name])
        if name not in self.paths:
            pytest.fail(f"no test program {name!r}")
        return str(self.paths[name])


def _compile(src: Path, out: Path, flags: list[str]) -> str | None:
    r = subprocess.run(["gcc", *flags, "-o", str(out), str(src)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return r.stderr or f"gcc exited {r.returncode}"
    os.chmod(out, 0o755)
    return None


def build_programs(outdir: Path) -> Bins:
    """gcc every tests/progs/*.c into ``outdir``, plus memhog from
    shared/workloads (which is read-only: built here, not there)."""
    bins = Bins(outdir)
    jobs = {src.stem: (src, CFLAGS) for src in sorted(PROGS_DIR.glob("*.c"))}
    memhog = shared_dir() / "workloads" / "memhog.c"
    if memhog.exists():
        jobs["memhog"] = (memhog, ["-O2", "-g", "-Wall"])
    else:
        bins.missing["memhog"] = f"{memhog} not found (set LCR_SHARED)"
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        futs = {name: ex.submit(_compile, src, outdir / name, flags)
                for name, (src, flags) in jobs.items()}
    for name, fut in futs.items():
        err = fut.result()
        if err:
            bins.errors[name] = err
        else:
            bins.paths[name] = outdir / name
    return bins


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


# --------------------------------------------------------------------------
# the test programs

def _pattern_bytes(n: int) -> bytes:
    """byte(i) = (i * 131 + 7) % 251, as files.c expects (period 251)."""
    period = bytes((i * 131 + 7) % 251 for i in range(251))
    return (period * (n // 251 + 1))[:n]


def _files_argv(bins: Bins, tmp: Path) -> list:
    d = tmp / "files-dir"
    d.mkdir(exist_ok=True)
    (d / "read.dat").write_bytes(_pattern_bytes(1 << 20))
    (d / "append.txt").write_text("first line\n")
    (d / "rdwr.dat").write_bytes(b"." * 65536)
    return [bins["files"], d / "read.dat", d / "append.txt", d / "rdwr.dat", d]


def _mem_argv(bins: Bins, tmp: Path) -> list:
    d = tmp / "mem-dir"
    d.mkdir(exist_ok=True)
    return [bins["mem"], d]


IDENT_ARGS = ["alpha", "with space", "", "ünïcödé ✓", "x" * 300, "-last"]


@dataclass(frozen=True)
class Prog:
    id: str                                   # test id
    name: str                                 # name in its PASS/FAIL lines
    argv: Callable[[Bins, Path], list]
    env: dict = field(default_factory=dict)
    heartbeat: bool = False                   # prints "HB n=N" lines
    python: bool = False


PROGRAMS: dict[str, Prog] = {p.id: p for p in [
    Prog("counter", "counter", lambda b, t: [b["counter"]]),
    Prog("files", "files", _files_argv),
    Prog("signals", "signals", lambda b, t: [b["signals"]]),
    Prog("fpu", "fpu", lambda b, t: [b["fpu"]]),
    Prog("mem", "mem", _mem_argv),
    Prog("ident", "ident", lambda b, t: [b["ident"], *IDENT_ARGS],
         env={"LCR_IDENT_ENV": "héllo wörld"}),
    Prog("sleeper-long", "sleeper", lambda b, t: [b["sleeper"], "long"], heartbeat=True),
    Prog("sleeper-short", "sleeper", lambda b, t: [b["sleeper"], "short"], heartbeat=True),
    Prog("rseq", "rseq", lambda b, t: [b["rseq"]]),
    Prog("threads", "threads", lambda b, t: [b["threads"]]),
    Prog("unsupported", "unsupported", lambda b, t: [b["unsupported"]]),
    Prog("pycount", "pycount",
         lambda b, t: [sys.executable, PROGS_DIR / "pycount.py", t / "pycount.txt"],
         python=True),
    Prog("pynumpy", "pynumpy",
         lambda b, t: [sys.executable, PROGS_DIR / "pynumpy.py", "32"], python=True),
]}

# what checkpoint/restart must handle (unsupported.c holds an io_uring fd:
# its checkpoint must be refused)
CHECKPOINTABLE = [p for p in PROGRAMS.values() if p.id != "unsupported"]


@dataclass
class Running:
    pid: int
    log: Path
    prog: Prog | None = None
    popen: subprocess.Popen | None = None
    ready: str = ""

    def assert_pass(self, pid: int | None = None) -> re.Match:
        return assert_pass(self.pid if pid is None else pid, self.log, self.prog.name)


def start_prog(procs: Procs, prog: Prog | str, bins: Bins, tmp: Path,
               prefix: Iterable[str] = (), log: Path | None = None) -> Running:
    """Start a tests/progs program and wait for its READY line (whose pid must
    be the one we started).  ``prefix``: e.g. setpriv to run as another user
    (it execs, so the pid stays)."""
    if isinstance(prog, str):
        prog = PROGRAMS[prog]
    if prog.id == "pynumpy":
        pytest.importorskip("numpy")
    argv = [*prefix, *prog.argv(bins, tmp)]
    log = log or tmp / f"{prog.id}.log"
    p = procs.start(argv, log, env=child_env(prog.env))
    m = wait_for_line(log, r"^READY pid=(\d+)", READY_TIMEOUT, pid=p.pid)
    assert int(m.group(1)) == p.pid, f"READY from pid {m.group(1)}, started {p.pid}"
    return Running(p.pid, log, prog, p, m.string)


def start_memhog(procs: Procs, bins: Bins, tmp: Path, mib: int) -> Running:
    log = tmp / f"memhog-{mib}.log"
    p = procs.start([bins["memhog"], "-f", str(mib)], log)
    wait_for_line(log, rf"^pid={p.pid} ready\b", READY_TIMEOUT, pid=p.pid)
    return Running(p.pid, log, None, p)


def start_pyhog(procs: Procs, tmp: Path, mib: int) -> Running:
    pyhog = shared_dir() / "workloads" / "pyhog.py"
    if not pyhog.exists():
        pytest.skip(f"{pyhog} not found (set LCR_SHARED)")
    log = tmp / f"pyhog-{mib}.log"
    p = procs.start([sys.executable, pyhog, "-f", str(mib)], log)
    m = wait_for_line(log, rf"^pid={p.pid} ready\b", READY_TIMEOUT, pid=p.pid)
    return Running(p.pid, log, None, p, m.string)
