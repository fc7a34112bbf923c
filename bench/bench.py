#!/usr/bin/env python3
"""bench.py -- linuxcr checkpoint/restart benchmark, with CRIU and
process_vm_readv measured in the same run for reference.

    python3 bench/bench.py [--cases memhog,tree,threads,rootless]
                           [--sizes 256,1024] [--tree 8x64] [--threads 8x32]
                           [--rootless-size 1024] [--rootless-user lcrtest]
                           [--runs 3] [--json out.json] [--modes lcr,api,criu]
                           [--dir /var/tmp/lcr-bench] [--install-criu]
                           [--no-prewarm] [--keep-images]

Workloads (cases):

  memhog    the shared memhog (N MiB of incompressible private anonymous
            memory, a running checksum, answers SIGUSR1 with
            "counter=N ... OK|MISMATCH"), one process, for every --sizes N
  tree      bench/treehog.c: a tree of P processes (root + P-1 children),
            M MiB each (--tree PxM, default 8x64); SIGUSR1 to the root
            -> one checksum line per process
  threads   bench/threadhog.c: one process, T worker threads with M MiB of
            their own each (--threads TxM, default 8x32); SIGUSR1 -> one
            checksum line per thread
  rootless  memhog --rootless-size MiB checkpointed and restarted with the
            lcr CLI as root and as --rootless-user (default lcrtest), each
            on a memhog started by the same user, image in a directory of
            that user: the cost of running without root

For every workload and every run, one step per mode, in an order that
rotates from run to run (interleaving):

  lcr    `lcr checkpoint PID -o IMG` and `lcr restart IMG` as subprocesses
         (wall clock around each, interpreter start-up included)
  lcrz   the same with `--compress`
  api    linuxcr.checkpoint(pid, IMG) / linuxcr.restart(IMG) timed inside a
         long-lived worker interpreter that imported linuxcr beforehand (no
         start-up cost; the worker is separate so that a crash or hang of the
         engine cannot take the benchmark with it)
  criu   `criu dump -t PID -D DIR`, `criu restore -d -D DIR` (as
         shared/anchors/bench-criu.sh does), when the criu binary exists
  pvr    (memhog only) `rawbw pvr PID ADDR BYTES 4096 3` on a fresh memhog:
         the process_vm_readv throughput, i.e. the copy limit of a
         checkpointer
  root / user  (rootless only) `lcr` as root / as the unprivileged user

Each checkpoint/restart step: start the workload, probe (SIGUSR1), sync +
pre-warm (write and delete a scratch file of size+64 MiB, untimed), time the
checkpoint, wait until every pid of the workload is gone, measure the image,
pre-warm, time the restart, probe again.  The step is OK only if every
checksum matches and every counter advanced; a failed step is reported as
FAIL and is not timed.  Medians are over the OK runs.  The benchmark is a
child subreaper, so orphans (detached workloads, restored trees, lcr's
namespace init) are reaped by it; every process started here is killed by
pid.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1 << 20
GiB = 1 << 30

# -------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_shared(explicit: str | None) -> Path:
    cands = [explicit, os.environ.get("LCR_SHARED"), REPO.parent / "shared", "/work/shared"]
    for c in cands:
        if c and (Path(c) / "workloads" / "memhog.c").is_file():
            return Path(c).resolve()
    sys.exit("bench: cannot find shared/workloads/memhog.c (use --shared DIR)")


def build_workloads(shared: Path, out: Path) -> dict[str, Path]:
    """Compile memhog and rawbw from the (read-only) shared dir, and treehog
    and threadhog from bench/, into OUT (world-readable: the rootless case
    runs memhog as another user)."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    cc = os.environ.get("CC", "gcc")
    res = {}
    for name, src, extra in (("memhog", shared / "workloads" / "memhog.c", []),
                             ("rawbw", shared / "workloads" / "rawbw.c", []),
                             ("treehog", HERE / "treehog.c", []),
                             ("threadhog", HERE / "threadhog.c", ["-pthread"])):
        exe = out / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run([cc, "-O2", "-g", "-Wall", "-Wextra", *extra, "-o", str(exe), str(src)], check=True)
        exe.chmod(0o755)
        res[name] = exe
    return res


def set_subreaper() -> bool:
    """Become a child subreaper: orphans of our descendants (detached
    workloads, restored processes, lcr's namespace init) are reparented to
    us and reaped at once, instead of by pid 1, which reaps lazily here."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0        # PR_SET_CHILD_SUBREAPER
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """PID and all its descendants (pre-order), from /proc/*/task/*/children."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        if p in out:
            continue
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                stack += [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                pass
    return out


def status_field(pid: int, key: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def ns_init_parent(pid: int) -> int | None:
    """The parent of PID if it is pid 1 of a child pid namespace (lcr's
    namespace init after a rootless restart), else None."""
    pp = status_field(pid, "PPid")
    if not pp or int(pp) in (0, 1, os.getpid()):
        return None
    ns = (status_field(int(pp), "NSpid") or "").split()
    return int(pp) if len(ns) > 1 and ns[-1] == "1" else None


def proc_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def try_reap(pid: int) -> None:
    """Reap PID if it happens to be our child (otherwise pid 1 does it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pid: int, timeout: float = 30.0, reaper=None) -> bool:
    """Wait until /proc/PID is gone (pid 1 reaps orphans lazily here)."""
    end = time.monotonic() + timeout
    while True:
        try_reap(pid)
        if reaper:
            reaper(pid)
        if not proc_alive(pid):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def prewarm(root: Path, mib: int) -> None:
    """Recycle MIB of guest memory through the page cache (untimed).

    In this VM, freshly allocated memory costs host faults; pages freed from
    the page cache are fast.  Same as bench-criu.sh -w."""
    f = root / f".warm.{os.getpid()}"
    buf = b"\0" * MiB
    with open(f, "wb") as fh:
        for _ in range(mib):
            fh.write(buf)
    f.unlink()


def tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def git_describe() -> str | None:
    """The commit measured (+ '-dirty' with uncommitted changes)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pwd_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


CRIU_PREFIXES = ("/opt/criu-sid", "/opt/criu-trixie")   # CRIU 4.2 first, then 4.1


def default_criu(name: str) -> str:
    """The newest installed CRIU build (install-criu.sh: SUITE=sid gives 4.2)."""
    for pre in CRIU_PREFIXES:
        if os.access(f"{pre}/{name}", os.X_OK):
            return f"{pre}/{name}"
    return f"{CRIU_PREFIXES[-1]}/{name}"


def proc_cpu(pids: list[int]) -> float:
    """User + system seconds the live processes PIDS have used (all threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])          # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def load1() -> float:
    """The 1-minute load average now (recorded with every figure)."""
    return round(os.getloadavg()[0], 2)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def last_line(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------- workload


class Hog:
    """A workload that detaches (prints "PID ready") and answers SIGUSR1 with
    one "counter=N ... OK|MISMATCH" line per member in its log (memhog: one
    line; treehog: one per process, threadhog: one per thread, tagged idx=I).

    ARGV is the command without "-o LOG SIZE"; KW (e.g. user=, group=) goes
    to subprocess.run, to start it as another user."""

    def __init__(self, argv: list[str], size: int, logfile: Path, members: int = 1, **kw):
        self.argv, self.size, self.log, self.members, self.kw = argv, size, logfile, members, kw
        self.pid = 0

    def start(self) -> int:
        self.log.unlink(missing_ok=True)
        r = subprocess.run(self.argv + ["-o", str(self.log), str(self.size)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                           cwd=str(self.log.parent), **self.kw)
        m = re.match(r"(\d+) ready", r.stdout)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"{Path(self.argv[0]).name} {self.size} failed: {r.stdout!r} {r.stderr!r}")
        self.pid = int(m.group(1))
        return self.pid

    def _lines(self) -> list[str]:
        try:
            return [l for l in self.log.read_text(errors="replace").splitlines() if "counter=" in l]
        except OSError:
            return []

    def probe(self, pid: int | None = None, timeout: float = 60.0) -> tuple[dict[int, int], str]:
        """SIGUSR1 -> ({member: counter}, 'OK'|'MISMATCH'|'INCOMPLETE'|'DEAD'|'NOREPLY')."""
        pid = pid or self.pid
        n = len(self._lines())
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return {}, "DEAD"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            new = self._lines()[n:]
            if len(new) >= self.members:
                counters, bad = {}, False
                for line in new[:self.members]:
                    m = re.search(r"idx=(\d+)", line)
                    c = re.search(r"counter=(\d+)", line)
                    counters[int(m.group(1)) if m else 0] = int(c.group(1))
                    bad |= not line.rstrip().endswith(" OK")
                if bad:
                    return counters, "MISMATCH"
                if sorted(counters) != list(range(self.members)):
                    return counters, "INCOMPLETE"
                return counters, "OK"
            if not proc_alive(pid):
                return {}, "DEAD"
            time.sleep(0.02)
        return {}, "NOREPLY"


class Memhog(Hog):
    def __init__(self, exe: Path, mib: int, logfile: Path, **kw):
        super().__init__([str(exe)], mib, logfile, 1, **kw)
        self.mib = mib
        self.addr = 0

    def start(self) -> int:
        pid = super().start()
        m = re.search(r"addr=(0x[0-9a-f]+)", self.log.read_text())
        self.addr = int(m.group(1), 16) if m else 0
        return pid


class Workload:
    """One line of the table: what to start, how big, which modes."""

    def __init__(self, case: str, label: str, tag: str, mib: int, modes: list[str], make):
        self.case, self.label, self.tag, self.mib, self.modes, self.make = case, label, tag, mib, modes, make


# ---------------------------------------------------------------------- tools


API_WORKER = r"""
import json, os, sys, time, traceback
t0 = time.perf_counter()
try:
    import linuxcr
    err = None
except BaseException as e:
    err = "%s: %s" % (type(e).__name__, e)
out = sys.stdout
out.write(json.dumps({"ready": err is None, "import_s": time.perf_counter() - t0, "error": err}) + "\n")
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    rep = {"ok": True}
    try:
        if op == "reap":
            try:
                os.waitpid(req["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
        elif op == "checkpoint":
            t = time.perf_counter()
            linuxcr.checkpoint(req["pid"], req["path"], leave_running=False)
            rep["s"] = time.perf_counter() - t
        elif op == "restart":
            t = time.perf_counter()
            pid = linuxcr.restart(req["path"])
            rep["s"] = time.perf_counter() - t
            rep["pid"] = int(pid)
        elif op == "quit":
            break
    except BaseException as e:
        rep = {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""),
               "tb": traceback.format_exc()[-2000:]}
    out.write(json.dumps(rep) + "\n")
    out.flush()
"""


class ApiWorker:
    """A long-lived interpreter with linuxcr imported: times the API calls
    without interpreter start-up.  Restarted after a crash or a hang."""

    def __init__(self, timeout: float, logfile: Path):
        self.timeout = timeout
        self.logfile = logfile
        self.p: subprocess.Popen | None = None
        self.import_s = None
        self.start_error = None

    def _start(self):
        self.p = subprocess.Popen([sys.executable, "-c", API_WORKER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=open(self.logfile, "a"), text=True,
                                  cwd=str(REPO))
        hello = json.loads(self._readline(60))
        self.import_s = hello.get("import_s")
        if not hello["ready"]:
            self.start_error = hello["error"]
            self.stop()
            raise RuntimeError(f"import linuxcr failed: {hello['error']}")

    def _readline(self, timeout: float) -> str:
        import select
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"API worker gave no answer in {timeout:.0f}s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"API worker died (rc={self.p.wait()})")
        return line

    def call(self, **req) -> dict:
        try:
            if self.p is None or self.p.poll() is not None:
                self._start()
            self.p.stdin.write(json.dumps(req) + "\n")
            self.p.stdin.flush()
            return json.loads(self._readline(self.timeout))
        except (TimeoutError, RuntimeError, BrokenPipeError) as e:
            self.stop()
            return {"ok": False, "error": str(e)}

    def reap(self, pid: int) -> None:
        if self.p is not None and self.p.poll() is None:
            self.call(op="reap", pid=pid)

    def stop(self):
        if self.p is None:
            return
        if self.p.poll() is None:
            try:
                self.p.stdin.write('{"op": "quit"}\n')
                self.p.stdin.flush()
                self.p.wait(timeout=5)
            except Exception:
                self.p.kill()
                self.p.wait()
        self.p = None


# ---------------------------------------------------------------- benchmark


class Bench:
    def __init__(self, args):
        self.a = args
        self.root = Path(args.dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)     # the rootless case's user needs to reach its dirs
        self.shared = find_shared(args.shared)
        self.exe = build_workloads(self.shared, self.root / "bin")
        self.subreaper = set_subreaper()
        self.live: set[int] = set()          # pids we started and have not seen gone
        self.lcr = shlex.split(args.lcr) if args.lcr else [sys.executable, "-m", "linuxcr"]
        self.criu = args.criu
        self.crit = args.crit
        self.worker = ApiWorker(args.timeout, self.root / "api-worker.log") if "api" in args.modes else None
        # lcragent: `lcr checkpoint` handed off to a running, warm agent (linuxcr/handoff.py)
        self.agent_dir = self.start_agent() if "lcragent" in args.modes else None
        self.records: list[dict] = []
        self.last_cpu: float | None = None
        self.meta: dict | None = None
        self.modes: list[str] = []
        self.workloads: list[Workload] = []

    # ---- process bookkeeping
    def kill(self, pid: int, reaper=None) -> None:
        if pid and proc_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pid and wait_gone(pid, reaper=reaper):
            self.live.discard(pid)

    def kill_all(self, pids, reaper=None) -> None:
        """SIGKILL all of PIDS first, then wait for each (a tree dies at once)."""
        pids = [p for p in dict.fromkeys(pids) if p]
        for p in pids:
            if proc_alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in pids:
            self.kill(p, reaper)
        self.reap_orphans()

    def reap_orphans(self) -> None:
        """Reap zombie children we did not start ourselves (orphans handed to
        us as subreaper, e.g. helpers of criu or lcr); never the API worker."""
        keep = {self.worker.p.pid} if self.worker and self.worker.p else set()
        try:
            kids = [int(x) for t in os.listdir("/proc/self/task")
                    for x in Path(f"/proc/self/task/{t}/children").read_text().split()]
        except OSError:
            return
        for k in kids:
            if k not in keep and (status_field(k, "State") or "").startswith("Z"):
                try_reap(k)

    def cleanup(self) -> None:
        self.kill_all(sorted(self.live), reaper=self.worker.reap if self.worker else None)
        if self.worker:
            self.worker.stop()
        self.stop_agent()

    def user_kw(self, user: str | None, home: Path | None = None) -> dict:
        """subprocess kwargs that run a command as USER (None: as ourselves),
        with the same environment either way (PYTHONPATH = the repo)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if user is None:
            return {"env": env}
        import pwd
        pw = pwd.getpwnam(user)
        env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=str(home or pw.pw_dir))
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": env}

    def run_cmd(self, argv, save: Path | None = None, **kw):
        """-> (rc or None on timeout, wall seconds, stdout, stderr); SAVE.{out,err} kept."""
        import resource
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=self.a.timeout, **kw)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = None, "", f"timeout after {self.a.timeout:.0f}s: {' '.join(map(str, argv[:4]))}"
        dt = time.perf_counter() - t
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time of the command and the children it reaped (user + system):
        # far less sensitive to other load on the machine than the wall clock
        self.last_cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
        if save is not None:
            Path(str(save) + ".cmd").write_text(shlex.join(map(str, argv)) + f"\nrc={rc} {dt:.4f}s\n")
            Path(str(save) + ".out").write_text(out or "")
            Path(str(save) + ".err").write_text(err or "")
        return rc, dt, out, err

    def start_agent(self) -> Path:
        """An lcr agent of our own (its dir), started and warm before the runs."""
        d = self.root / "agent"
        d.mkdir(mode=0o700, exist_ok=True)
        env = dict(os.environ, LCR_AGENT_DIR=str(d))
        subprocess.run(self.lcr + ["agent"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 60
        while not (d / "agent.log").exists() or "serving" not in (d / "agent.log").read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the lcr agent did not start ({d})")
            time.sleep(0.05)
        time.sleep(0.5)     # its warm-up imports (after "serving")
        return d

    def stop_agent(self) -> None:
        if self.agent_dir is not None:
            try:
                os.kill(int((self.agent_dir / "agent.pid").read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass

    def lcr_env(self, mode: str, ukw: dict | None) -> dict:
        """subprocess kwargs of lcr in MODE: lcr/lcrz in-process (LCR_NO_AGENT=1),
        lcragent through our agent."""
        kw = dict(ukw or {})
        env = dict(kw.get("env") or os.environ)
        if mode == "lcragent":
            env.pop("LCR_NO_AGENT", None)
            env["LCR_AGENT_DIR"] = str(self.agent_dir)
        else:
            env["LCR_NO_AGENT"] = "1"
        kw["env"] = env
        return kw

    # ---- one mode's checkpoint + restart
    def ckpt(self, mode, pid, img, ukw=None):
        """-> (ok, seconds, error); UKW: subprocess kwargs for lcr (another user)"""
        if mode in ("lcr", "lcrz", "lcragent"):
            argv = self.lcr + ["checkpoint", str(pid), "-o", str(img)]
            if mode == "lcrz":
                argv.append("--compress")
            rc, dt, out, err = self.run_cmd(argv, save=img.parent / "checkpoint",
                                            **self.lcr_env(mode, ukw))
            if rc != 0:
                return False, dt, f"lcr checkpoint rc={rc}: {last_line(err) or last_line(out)}"
            return True, dt, None
        if mode == "api":
            rep = self.worker.call(op="checkpoint", pid=pid, path=str(img))
            self._save_tb(img.parent / "checkpoint.traceback", rep)
            if not rep["ok"]:
                return False, None, f"linuxcr.checkpoint: {rep['error']}"
            return True, rep["s"], None
        if mode == "criu":
            img.mkdir(parents=True, exist_ok=True)
            logf = img.parent / "criu-dump.log"
            rc, dt, out, err = self.run_cmd([self.criu, "dump", "-t", str(pid), "-D", str(img),
                                             "-o", str(logf), f"-v{self.a.criu_v}"])
            if rc != 0:
                return False, dt, f"criu dump rc={rc}: {self._criu_err(logf, err)}"
            return True, dt, None
        raise ValueError(mode)

    def restart(self, mode, img, pid, ukw=None):
        """-> (ok, seconds, restored_pid, error)"""
        if mode in ("lcr", "lcrz", "lcragent"):
            rc, dt, out, err = self.run_cmd(self.lcr + ["restart", str(img)], save=img.parent / "restart",
                                            **self.lcr_env(mode, ukw))
            if rc != 0:
                return False, dt, None, f"lcr restart rc={rc}: {last_line(err) or last_line(out)}"
            try:
                return True, dt, int(out.strip()), None
            except ValueError:
                return False, dt, None, f"lcr restart printed {out.strip()[:80]!r}, not a pid"
        if mode == "api":
            rep = self.worker.call(op="restart", path=str(img))
            self._save_tb(img.parent / "restart.traceback", rep)
            if not rep["ok"]:
                return False, None, None, f"linuxcr.restart: {rep['error']}"
            return True, rep["s"], rep["pid"], None
        if mode == "criu":
            logf = img.parent / "criu-restore.log"
            rc, dt, out, err = self.run_cmd([self.criu, "restore", "-d", "-D", str(img),
                                             "-o", str(logf), f"-v{self.a.criu_v}"])
            if rc != 0:
                return False, dt, None, f"criu restore rc={rc}: {self._criu_err(logf, err)}"
            return True, dt, pid, None
        raise ValueError(mode)

    @staticmethod
    def _save_tb(path: Path, rep: dict) -> None:
        if rep.get("tb"):
            path.write_text(rep["tb"])

    @staticmethod
    def _criu_err(logf: Path, stderr: str) -> str:
        try:
            errs = [l for l in logf.read_text(errors="replace").splitlines() if "Error" in l]
        except OSError:
            errs = []
        # criu 4.1 always logs a harmless RLIMIT_NOFILE error here (no CAP_SYS_RESOURCE)
        real = [l for l in errs if "RLIMIT_NOFILE for self" not in l and "FAILED" not in l]
        if real or errs:
            return (real or errs)[0].strip()[:300]
        return last_line(stderr)

    def crit_stats(self, img: Path) -> dict:
        out = {}
        if not (self.crit and os.access(self.crit, os.X_OK)):
            return out
        for f, key in (("stats-dump", "dump"), ("stats-restore", "restore")):
            try:
                r = subprocess.run([self.crit, "show", str(img / f)], capture_output=True, text=True, timeout=60)
                out[key] = json.loads(r.stdout)["entries"][0][key]
            except Exception:
                pass
        return out

    def step(self, wl: Workload, mode: str, run: int) -> dict:
        d = self.root / f"{wl.tag}.{run}.{mode}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        d.chmod(0o755)
        # rootless case: mode root / user = the lcr CLI as root / as the user
        tool = "lcr" if mode in ("root", "user", "base") else mode
        user = self.a.rootless_user if mode == "user" else None
        ukw = self.user_kw(user, d) if wl.case == "rootless" else None
        if mode == "base":      # the lcr CLI of another checkout (--baseline), same everything else
            ukw = {"env": dict(os.environ, PYTHONPATH=str(self.a.baseline))}
        if user:
            os.chown(d, ukw["user"], ukw["group"])
            ukw["cwd"] = str(d)     # not our cwd: the user may not be allowed in
        img = d / ("img" if tool == "criu" else "image.lcr")
        rec = {"case": wl.case, "workload": wl.label, "size_mib": wl.mib, "run": run, "mode": mode,
               "user": user or pwd_name(os.geteuid()), "ok": False, "verify": "FAIL",
               "ckpt_s": None, "restart_s": None, "img_bytes": None, "error": None, "load": load1()}
        reaper = self.worker.reap if tool == "api" else None
        hkw = {k: v for k, v in (ukw or {}).items() if k in ("user", "group", "extra_groups", "env")}
        hog = wl.make(d / "workload.log", **hkw)
        pid = rpid = 0
        pids: list[int] = []       # the workload's pids (restored at the same pids as root)
        rpids: list[int] = []      # the restored pids as we see them, + lcr's namespace init
        try:
            pid = hog.start()
            self.live.add(pid)
            pids = descendants(pid)
            self.live.update(pids)
            rec.update(pid=pid, nproc=len(pids), nthreads=len(os.listdir(f"/proc/{pid}/task")))
            c0, s0 = hog.probe()
            if s0 != "OK":
                raise StepFail(f"{wl.case} probe before checkpoint: {s0}")
            if self.a.prewarm:
                os.sync()
                prewarm(self.root, wl.mib + 64)
            self.last_cpu = None
            ok, dt, err = self.ckpt(tool, pid, img, ukw)
            rec["ckpt_cpu_s"] = self.last_cpu
            if not ok:
                raise StepFail(err)
            rec["ckpt_wall_s"] = dt
            left = [p for p in pids if not wait_gone(p, self.a.gone_timeout)]
            if left:
                raise StepFail(f"pid(s) {' '.join(map(str, left))} still exist {self.a.gone_timeout:.0f}s "
                               "after checkpoint (not killed, or not reaped)")
            self.live.difference_update(pids)
            rec["img_bytes"] = tree_bytes(img)
            if self.a.prewarm:
                prewarm(self.root, wl.mib + 64)
            # the restore brings the processes back at their saved pids: count
            # them as ours from now on, so an interrupt during the restore
            # still kills them
            self.live.update(pids)
            self.last_cpu = None
            ok, rt, rpid, err = self.restart(tool, img, pid, ukw)
            # + the CPU the restored processes used so far (CRIU's restorer
            # runs in them, detached: no rusage of a reaped child shows it)
            rec["restart_cpu_s"] = (self.last_cpu + proc_cpu(descendants(rpid))
                                    if rpid and self.last_cpu is not None else None)
            if rpid:
                rpids = descendants(rpid)
                init = ns_init_parent(rpid)
                if init:
                    rpids.append(init)
                    rec["ns_init"] = init
                self.live.update(rpids)
            if not ok:
                raise StepFail(err)
            rec["restored_pid"] = rpid
            rec["restored_nproc"] = len(descendants(rpid))
            rec["restored_nthreads"] = len(os.listdir(f"/proc/{rpid}/task")) if proc_alive(rpid) else 0
            c1, s1 = hog.probe(rpid)
            rpids += [p for p in descendants(rpid) if p not in rpids]
            self.live.update(rpids)
            rec["counter"] = [c0, c1]
            stuck = sorted(i for i, c in c0.items() if c1.get(i, 0) <= c)
            if s1 != "OK" or stuck:
                raise StepFail(f"verify after restart: {s1}, {len(c1)}/{len(c0)} members answered"
                               + (f", counter not advanced for member(s) {stuck}" if stuck and c1 else ""))
            rec.update(ok=True, verify="OK", ckpt_s=dt, restart_s=rt, load_end=load1())
            if tool == "criu":
                rec["crit"] = self.crit_stats(img)
        except StepFail as e:
            rec["error"] = str(e)
        except Exception as e:  # harness trouble: report, go on
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            self.kill_all([p for p in rpids + pids + [rpid, pid] if p in self.live], reaper)
            if not self.a.keep_images:
                shutil.rmtree(img, ignore_errors=True) if img.is_dir() else img.unlink(missing_ok=True)
        return rec

    def pvr_step(self, mib: int, run: int) -> dict:
        d = self.root / f"{mib}.{run}.pvr"
        d.mkdir(parents=True, exist_ok=True)
        hog = Memhog(self.exe["memhog"], mib, d / "workload.log")
        rec = {"case": "memhog", "workload": f"memhog {mib}", "size_mib": mib, "run": run, "mode": "pvr",
               "ok": False, "error": None, "load": load1()}
        pid = 0
        try:
            pid = hog.start()
            self.live.add(pid)
            argv = [str(self.exe["rawbw"]), "pvr", str(pid), hex(hog.addr), str(mib * MiB), "4096", "3"]
            rc, _, out, err = self.run_cmd(argv)
            m = re.search(r"process_vm_readv\(best\)\s+(\d+) MiB\s+([\d.]+) s\s+([\d.]+) GiB/s", out)
            if rc != 0 or not m:
                raise StepFail(f"rawbw rc={rc}: {last_line(err) or last_line(out)}")
            s = float(m.group(2))
            rec.update(ok=True, seconds=s, bytes=mib * MiB, gib_s=float(m.group(3)),
                       bytes_per_s=mib * MiB / s if s > 0 else None, raw=out.strip())
        except Exception as e:
            rec["error"] = str(e)
        finally:
            self.kill(pid)
        return rec

    def pagecache_step(self, mib: int, run: int) -> dict:
        """The page-cache copy limits of an image of MIB: write MIB (1 MiB
        writes of incompressible bytes, no fsync: what a checkpoint to a
        file must at least do) and read it back into fresh anonymous memory
        (what a restart must at least do), both pre-warmed like the steps."""
        import mmap
        rec = {"case": "memhog", "workload": f"memhog {mib}", "size_mib": mib, "run": run, "mode": "pcache",
               "ok": False, "error": None, "load": load1()}
        f = self.root / f".pcache.{os.getpid()}"
        buf = os.urandom(MiB)
        try:
            if self.a.prewarm:
                os.sync()
                prewarm(self.root, mib + 64)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                t = time.perf_counter()
                for _ in range(mib):
                    os.write(fd, buf)
                w = time.perf_counter() - t
            finally:
                os.close(fd)
            if self.a.prewarm:
                prewarm(self.root, mib + 64)
            mem = mmap.mmap(-1, mib * MiB)
            fd = os.open(f, os.O_RDONLY)
            try:
                view = memoryview(mem)
                t = time.perf_counter()
                off = 0
                while off < mib * MiB:
                    n = os.readv(fd, [view[off:off + 4 * MiB]])
                    if n <= 0:
                        raise StepFail("short read of the page-cache file")
                    off += n
                r = time.perf_counter() - t
                view.release()
            finally:
                os.close(fd)
                mem.close()
            rec.update(ok=True, write_s=w, read_s=r, bytes=mib * MiB)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            f.unlink(missing_ok=True)
        return rec

    def compile_lcr(self) -> str:
        """Byte-compile linuxcr, as `pip install` does: with
        PYTHONDONTWRITEBYTECODE=1 in the environment (this sandbox) and a
        source checkout, every `lcr` command compiled its ~70 modules from
        source again (~120 ms CPU, the largest part of the start-up).
        py_compile writes even so, and the interpreter reads what it finds."""
        dirs = [REPO / "linuxcr"] + ([Path(self.a.baseline) / "linuxcr"] if self.a.baseline else [])
        rc, dt, out, err = self.run_cmd([sys.executable, "-m", "compileall", "-q", *map(str, dirs)])
        return "compiled" if rc == 0 else f"compileall failed: {last_line(err) or last_line(out)}"

    def startup(self) -> dict:
        """Interpreter start-up + import cost of the CLI (what `lcr` pays)."""
        res = {}
        for name, argv in (("python", [sys.executable, "-c", "pass"]),
                           ("import_linuxcr_cli", [sys.executable, "-c", "import linuxcr.cli"])):
            ts = []
            for _ in range(5):
                rc, dt, _, err = self.run_cmd(argv, cwd=str(REPO))
                if rc != 0:
                    res[name + "_error"] = last_line(err)
                    break
                ts.append(dt)
            res[name + "_s"] = median(ts)
        return res

    # ---- the whole run
    def rootless_check(self) -> str | None:
        """Why the rootless case cannot run here (None if it can)."""
        user = self.a.rootless_user
        if os.geteuid() != 0:
            return "needs root (it runs lcr as root and as another user)"
        try:
            kw = self.user_kw(user)
        except KeyError:
            return f"no user {user!r} (useradd -m {user})"
        kw["cwd"] = str(self.root)
        rc, _, out, err = self.run_cmd(self.lcr + ["--version"], **kw)
        if rc != 0:
            return f"{user} cannot run {shlex.join(self.lcr)}: {last_line(err) or last_line(out)}"
        return None

    def plan(self, modes: list[str]) -> list[Workload]:
        a, ex = self.a, self.exe
        wls = []
        if "memhog" in a.cases:
            for mib in a.sizes:
                wls.append(Workload("memhog", f"memhog {mib}", str(mib), mib,
                                    modes + (["pvr", "pcache"] if a.pvr else []),
                                    lambda log, mib=mib, **kw: Memhog(ex["memhog"], mib, log, **kw)))
        if "tree" in a.cases:
            n, m = a.tree
            wls.append(Workload("tree", f"tree {n}x{m}", f"tree{n}x{m}", n * m, list(modes),
                                lambda log, n=n, m=m, **kw: Hog([str(ex["treehog"]), "-n", str(n)], m, log, n, **kw)))
        if "threads" in a.cases:
            t, m = a.threads
            wls.append(Workload("threads", f"threads {t}x{m}", f"threads{t}x{m}", t * m, list(modes),
                                lambda log, t=t, m=m, **kw: Hog([str(ex["threadhog"]), "-t", str(t)], m, log, t, **kw)))
        if "rootless" in a.cases:
            why = self.rootless_check()
            if why:
                log(f"bench: rootless case skipped: {why}")
                self.meta["rootless_skipped"] = why
            else:
                mib = a.rootless_size
                wls.append(Workload("rootless", f"rootless {mib}", f"rootless{mib}", mib, ["root", "user"],
                                    lambda log, mib=mib, **kw: Memhog(ex["memhog"], mib, log, **kw)))
        return wls

    def run(self) -> dict:
        a = self.a
        modes = list(a.modes)
        if "criu" in modes and not os.access(self.criu, os.X_OK):
            log(f"bench: no criu at {self.criu}: CRIU measurements skipped "
                "(--install-criu installs it)")
            modes.remove("criu")
        meta = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "lcr_cmd": self.lcr,
            "criu": self._criu_version() if "criu" in modes else None,
            "cases": a.cases, "sizes_mib": a.sizes, "tree": a.tree, "threads": a.threads,
            "rootless_size_mib": a.rootless_size, "rootless_user": a.rootless_user,
            "runs": a.runs, "modes": modes, "prewarm": a.prewarm, "pvr": a.pvr,
            "dir": str(self.root), "subreaper": self.subreaper,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "git": git_describe(),
        }
        log(f"# kernel {meta['kernel']}, {meta['cpus']} cpus, python {meta['python']}, "
            f"criu {meta['criu']}, images in {self.root}")
        self.meta, self.modes = meta, modes
        meta["bytecode"] = self.compile_lcr() if a.compile else "not compiled (--no-compile)"
        meta["startup"] = self.startup()
        self.workloads = self.plan(modes)
        t_start = time.monotonic()
        for wl in self.workloads:
            for run in range(1, a.runs + 1):
                k = (run - 1) % len(wl.modes)
                for mode in wl.modes[k:] + wl.modes[:k]:        # rotate: interleave the tools
                    name = f"  {wl.label:14s} run {run} {mode:5s}"
                    if mode == "pvr":
                        rec = self.pvr_step(wl.mib, run)
                        self.records.append(rec)
                        log(f"{name} " + (f"{rec['gib_s']:.2f} GiB/s" if rec["ok"] else f"FAIL {rec['error']}")
                            + f"  load {rec['load']}")
                        continue
                    if mode == "pcache":
                        rec = self.pagecache_step(wl.mib, run)
                        self.records.append(rec)
                        log(f"{name} " + (f"page-cache write {rec['write_s']*1e3:.1f} ms, read {rec['read_s']*1e3:.1f} ms"
                                          if rec["ok"] else f"FAIL {rec['error']}") + f"  load {rec['load']}")
                        continue
                    rec = self.step(wl, mode, run)
                    self.records.append(rec)
                    if rec["ok"]:
                        log(f"{name} checkpoint {rec['ckpt_s']*1e3:8.1f} ms  restart {rec['restart_s']*1e3:8.1f} ms  "
                            f"image {rec['img_bytes']/MiB:7.1f} MiB  OK  load {rec['load']}")
                    else:
                        log(f"{name} FAIL: {rec['error']}")
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return self.result()

    def result(self) -> dict | None:
        if self.meta is None:
            return None
        return {"meta": self.meta, "records": self.records, "summary": self.summarize()}

    def _criu_version(self):
        try:
            r = subprocess.run([self.criu, "--version"], capture_output=True, text=True, timeout=30)
            m = re.search(r"Version:\s*(\S+)", r.stdout)
            return m.group(1) if m else r.stdout.strip()
        except Exception as e:
            return f"? ({e})"

    def summarize(self) -> dict:
        out = {}
        all_pvr = median([r["bytes_per_s"] for r in self.records if r["mode"] == "pvr" and r["ok"]])
        pcs = [r for r in self.records if r["mode"] == "pcache" and r["ok"]]
        all_pcw = median([r["bytes"] / r["write_s"] for r in pcs])
        all_pcr = median([r["bytes"] / r["read_s"] for r in pcs])
        for wl in self.workloads:
            recs = [r for r in self.records if r["workload"] == wl.label]
            pv = [r for r in recs if r["mode"] == "pvr" and r["ok"]]
            # the copy limit: process_vm_readv of this memhog size, else of all sizes measured
            pvr_bps = median([r["bytes_per_s"] for r in pv]) if pv else all_pvr
            pc = [r for r in recs if r["mode"] == "pcache" and r["ok"]]
            s = {"case": wl.case, "size_mib": wl.mib, "pvr_bytes_per_s": pvr_bps, "pvr_runs": len(pv),
                 "pvr_from": "this size" if pv else ("all memhog sizes" if all_pvr else None), "modes": {},
                 # page-cache limits in bytes/s (this size, else all sizes measured)
                 "pcw_bytes_per_s": median([r["bytes"] / r["write_s"] for r in pc]) if pc else all_pcw,
                 "pcr_bytes_per_s": median([r["bytes"] / r["read_s"] for r in pc]) if pc else all_pcr,
                 "pcache_runs": len(pc)}
            modes = [m for m in wl.modes if m not in ("pvr", "pcache")]
            for mode in modes:
                rs = [r for r in recs if r["mode"] == mode]
                ok = [r for r in rs if r["ok"]]
                m = {"ok": len(ok), "runs": len(rs),
                     "ckpt_s": median([r["ckpt_s"] for r in ok]),
                     "restart_s": median([r["restart_s"] for r in ok]),
                     "img_bytes": median([r["img_bytes"] for r in ok]),
                     "ckpt_cpu_s": median([r.get("ckpt_cpu_s") for r in ok]),
                     "restart_cpu_s": median([r.get("restart_cpu_s") for r in ok]),
                     "ckpt_min_s": min([r["ckpt_s"] for r in ok], default=None),
                     "restart_min_s": min([r["restart_s"] for r in ok], default=None),
                     "errors": sorted({r["error"] for r in rs if r["error"]})}
                # checkpoint throughput in image bytes/s (per run, then median)
                m["ckpt_bytes_per_s"] = median([r["img_bytes"] / r["ckpt_s"] for r in ok if r["ckpt_s"]])
                m["ckpt_vs_pvr"] = (m["ckpt_bytes_per_s"] / pvr_bps
                                    if m["ckpt_bytes_per_s"] and pvr_bps else None)
                # time ÷ the time of the bare copy of the image's bytes (1.0: costs nothing but it)
                img = m["img_bytes"]
                m["ckpt_div_pcwrite"] = (m["ckpt_s"] / (img / s["pcw_bytes_per_s"])
                                         if m["ckpt_s"] and img and s["pcw_bytes_per_s"] else None)
                m["restart_div_pcread"] = (m["restart_s"] / (img / s["pcr_bytes_per_s"])
                                           if m["restart_s"] and img and s["pcr_bytes_per_s"] else None)
                m["ckpt_div_pvr"] = (m["ckpt_s"] / (img / pvr_bps) if m["ckpt_s"] and img and pvr_bps else None)
                loads = [r.get("load") for r in ok] + [r.get("load_end") for r in ok]
                loads = [x for x in loads if x is not None]
                m["load_min"], m["load_max"] = (min(loads), max(loads)) if loads else (None, None)
                s["modes"][mode] = m
            # ratios: ours / CRIU; rootless: as the user / as root
            ref = "criu" if "criu" in modes else ("root" if wl.case == "rootless" else None)
            c = s["modes"].get(ref) if ref else None
            ratios = {}
            for mode in modes:
                if mode == ref or not c:
                    continue
                m = s["modes"][mode]
                ck = m["ckpt_s"] / c["ckpt_s"] if m["ckpt_s"] and c["ckpt_s"] else None
                rs = m["restart_s"] / c["restart_s"] if m["restart_s"] and c["restart_s"] else None
                cpu = {k: m[k] / c[k] if m.get(k) and c.get(k) else None for k in ("ckpt_cpu_s", "restart_cpu_s")}
                ratios[mode] = {"ref": ref, "ckpt": ck, "restart": rs,
                                "ckpt_cpu": cpu["ckpt_cpu_s"], "restart_cpu": cpu["restart_cpu_s"],
                                f"ckpt_vs_{ref}": ck, f"restart_vs_{ref}": rs,
                                # best run against best run: less sensitive to other load
                                "ckpt_best": (m["ckpt_min_s"] / c["ckpt_min_s"]
                                              if m["ckpt_min_s"] and c["ckpt_min_s"] else None),
                                "restart_best": (m["restart_min_s"] / c["restart_min_s"]
                                                 if m["restart_min_s"] and c["restart_min_s"] else None)}
            s["ratios"] = ratios
            out[wl.label] = s
        return out


class StepFail(Exception):
    pass


# ---------------------------------------------------------------------- report


def fmt(v, spec, scale=1.0, none="-"):
    return none if v is None else format(v * scale, spec)


def ratio_table(res: dict) -> list[str]:
    """The issue's table: lcr ÷ CRIU, and lcr ÷ the copy limits, per workload."""
    L = ["", "# lcr ÷ CRIU (medians of interleaved runs; < 1 is faster); lcr ÷ limits = lcr time ÷ the "
         "bare copy of its image bytes (ckpt: page-cache write, rst: page-cache read into fresh memory, "
         "pvr: process_vm_readv); CPU ÷ = CPU time (user+system of the command and what it reaped) "
         "lcr ÷ CRIU, robust to other load; load = 1-min load average over the runs", ""]
    hdr = ("| workload | lcr ckpt | CRIU dump | ÷ | lcr restart | CRIU restore | ÷ | ckpt ÷ pc-write "
           "| ckpt ÷ pvr | rst ÷ pc-read | CPU ÷ ckpt/rst | load |")
    L += [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    for label, s, tool in [(label, s, tool) for label, s in res["summary"].items() for tool in ("base", "lcr")]:
        lm, cm = s["modes"].get(tool), s["modes"].get("criu")
        if not lm:
            continue
        r = s["ratios"].get(tool, {})
        if tool == "base":
            label = f"{label} (baseline)"
        lo = [x for m in (lm, cm) if m for x in (m.get("load_min"), m.get("load_max")) if x is not None]
        L.append(f"| {label} | {fmt(lm['ckpt_s'], '.0f', 1e3)} ms | {fmt(cm and cm['ckpt_s'], '.0f', 1e3)} ms "
                 f"| {fmt(r.get('ckpt'), '.2f')} | {fmt(lm['restart_s'], '.0f', 1e3)} ms "
                 f"| {fmt(cm and cm['restart_s'], '.0f', 1e3)} ms | {fmt(r.get('restart'), '.2f')} "
                 f"| {fmt(lm.get('ckpt_div_pcwrite'), '.2f')} | {fmt(lm.get('ckpt_div_pvr'), '.2f')} "
                 f"| {fmt(lm.get('restart_div_pcread'), '.2f')} "
                 f"| {fmt(r.get('ckpt_cpu'), '.2f')} / {fmt(r.get('restart_cpu'), '.2f')} "
                 f"| {f'{min(lo):.1f}-{max(lo):.1f}' if lo else '-'} |")
    lim = [(label, s) for label, s in res["summary"].items() if s.get("pcache_runs")]
    if lim:
        L.append("")
        L.append("# copy limits: " + "; ".join(
            f"{label}: page-cache write {fmt(s['pcw_bytes_per_s'], '.2f', 1 / GiB)} GiB/s, "
            f"read {fmt(s['pcr_bytes_per_s'], '.2f', 1 / GiB)} GiB/s, "
            f"process_vm_readv {fmt(s['pvr_bytes_per_s'], '.2f', 1 / GiB)} GiB/s" for label, s in lim))
    return L


def report(res: dict) -> str:
    L = []
    meta = res["meta"]
    st = meta.get("startup", {})
    L.append(f"# linuxcr bench {meta['date']}  kernel {meta['kernel']}  {meta['cpus']} cpus  "
             f"python {meta['python']}  criu {meta['criu'] or '-'}  lcr {meta.get('git') or '?'}  runs={meta['runs']}  "
             f"prewarm={meta['prewarm']}" + (f"  ({meta['elapsed_s']:.0f} s)" if meta.get("elapsed_s") else ""))
    if meta.get("loadavg_start"):
        L.append(f"# load average (1/5/15 min) at start {' '.join(map(str, meta['loadavg_start']))}"
                 + (f", at end {' '.join(map(str, meta['loadavg_end']))}" if meta.get("loadavg_end") else "")
                 + " (anything else running shows up in the times)")
    L.append(f"# linuxcr bytecode: {meta.get('bytecode', '?')}; "
             f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    L.append(f"# interpreter start-up: python -c pass {fmt(st.get('python_s'), '.0f', 1e3)} ms, "
             f"import linuxcr.cli {fmt(st.get('import_linuxcr_cli_s'), '.0f', 1e3)} ms"
             + (f" ({st['import_linuxcr_cli_error']})" if st.get("import_linuxcr_cli_error") else ""))
    L.append("# medians over OK runs; ckpt GiB/s = image bytes / checkpoint time; "
             "/pvr = that / process_vm_readv GiB/s; ckpt/ref, rst/ref = time / CRIU's time "
             "(rootless: as the user / as root)")
    L.append("")
    hdr = f"{'workload':14} {'tool':7} {'ok':>5} {'ckpt ms':>9} {'restart ms':>10} {'image MiB':>9} " \
          f"{'ckpt GiB/s':>10} {'/pvr':>6} {'ckpt/ref':>9} {'rst/ref':>9}"
    L.append(hdr)
    L.append("-" * len(hdr))
    user = meta.get("rootless_user") or "user"
    for label, s in res["summary"].items():
        for mode, m in s["modes"].items():
            r = s["ratios"].get(mode, {})
            r = r.get("ckpt"), r.get("restart")
            tool = {"root": "root", "user": user}.get(mode, mode)
            L.append(f"{label:14} {tool:7} {m['ok']:>2}/{m['runs']:<2} {fmt(m['ckpt_s'], '9.1f', 1e3):>9} "
                     f"{fmt(m['restart_s'], '10.1f', 1e3):>10} {fmt(m['img_bytes'], '9.1f', 1 / MiB):>9} "
                     f"{fmt(m['ckpt_bytes_per_s'], '10.2f', 1 / GiB):>10} {fmt(m['ckpt_vs_pvr'], '6.2f'):>6} "
                     f"{fmt(r[0], '9.2f'):>9} {fmt(r[1], '9.2f'):>9}")
        if s["case"] == "memhog" and meta.get("pvr", True):
            L.append(f"{label:14} {'pvr':7} {s['pvr_runs']:>2}/{meta['runs']:<2} "
                     f"process_vm_readv {fmt(s['pvr_bytes_per_s'], '.2f', 1 / GiB)} GiB/s "
                     "(rawbw pvr, 4 MiB chunks, best of 3)")
    L += ratio_table(res)
    for label, s in res["summary"].items():
        r = s["ratios"].get("user")
        if s["case"] == "rootless" and r:
            L.append("")
            L.append(f"# {label}: lcr as {user} / as root: checkpoint {fmt(r['ckpt_vs_root'], '.2f')}, "
                     f"restart {fmt(r['restart_vs_root'], '.2f')} (medians; best runs: "
                     f"{fmt(r['ckpt_best'], '.2f')}, {fmt(r['restart_best'], '.2f')}; target <= 1.1)")
    if any(s["case"] != "memhog" and s["pvr_from"] == "all memhog sizes" for s in res["summary"].values()):
        L.append("# /pvr of tree, threads, rootless: against the median process_vm_readv rate of all memhog sizes")
    if meta.get("rootless_skipped"):
        L.append(f"# rootless case skipped: {meta['rootless_skipped']}")
    errs = [(label, mode, e) for label, s in res["summary"].items()
            for mode, m in s["modes"].items() for e in m["errors"]]
    if errs:
        L.append("")
        L.append("# failures (distinct messages)")
        for label, mode, e in errs:
            L.append(f"  {label} {mode}: {e}")
    return "\n".join(L)


# ------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="memhog,tree,threads,rootless",
                   help="workloads, comma separated: memhog, tree, threads, rootless (default all)")
    p.add_argument("--sizes", default="256,1024", help="memhog sizes in MiB, comma separated (default 256,1024)")
    p.add_argument("--tree", default="8x64", help="tree: PROCESSESxMiB each (default 8x64)")
    p.add_argument("--threads", default="8x32", help="threads: THREADSxMiB each (default 8x32)")
    p.add_argument("--rootless-size", type=int, default=1024, help="rootless: memhog MiB (default 1024)")
    p.add_argument("--rootless-user", default="lcrtest", help="rootless: the unprivileged user (default lcrtest)")
    p.add_argument("--runs", type=int, default=3, help="runs per workload and tool (default 3)")
    p.add_argument("--modes", default="lcr,criu",
                   help="tools to time, comma separated: lcr (CLI), lcrz (CLI --compress), "
                        "api (Python API, warm interpreter), lcragent (CLI handing the "
                        "checkpoint and the restart to a running agent), criu "
                        "(default lcr,criu)")
    p.add_argument("--no-pvr", dest="pvr", action="store_false", help="skip the process_vm_readv limit")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false", help="do not pre-warm memory")
    p.add_argument("--baseline", metavar="DIR",
                   help="also time the lcr CLI of the checkout DIR (DIR/linuxcr, e.g. from "
                        "`git archive OLD linuxcr | tar -x -C DIR`) as tool `base`, interleaved "
                        "with the others: a before/after under the same load")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="do not byte-compile linuxcr first (measure a source checkout under "
                        "PYTHONDONTWRITEBYTECODE=1 as it is)")
    p.add_argument("--dir", default="/var/tmp/lcr-bench", help="work dir for images and logs (local disk)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    p.add_argument("--shared", help="the shared/ dir holding workloads/ and anchors/ (auto)")
    p.add_argument("--lcr", help="lcr command line (default: '<this python> -m linuxcr')")
    p.add_argument("--criu", default=os.environ.get("CRIU") or default_criu("criu"),
                   help="CRIU binary (default: /opt/criu-sid/criu (4.2) if present, else /opt/criu-trixie/criu)")
    p.add_argument("--crit", default=os.environ.get("CRIT") or default_criu("crit"))
    p.add_argument("--big", action="store_true",
                   help="add memhog 4096 MiB to --sizes (needs ~12 GiB free: workload, image, restore)")
    p.add_argument("--criu-v", type=int, default=2, help="criu log level (default 2)")
    p.add_argument("--install-criu", action="store_true",
                   help="run shared/anchors/install-criu.sh first if criu is missing (root)")
    p.add_argument("--timeout", type=float, default=600, help="per command timeout, s")
    p.add_argument("--gone-timeout", type=float, default=30, help="wait for a dumped pid to vanish, s")
    p.add_argument("--keep-images", action="store_true", help="keep the images (default: delete)")
    a = p.parse_args(argv)
    a.sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    if a.big and 4096 not in a.sizes:
        a.sizes.append(4096)
    a.cases = [x.strip() for x in a.cases.split(",") if x.strip()]
    badc = set(a.cases) - {"memhog", "tree", "threads", "rootless"}
    if badc:
        p.error(f"unknown case(s): {', '.join(sorted(badc))}")
    for opt in ("tree", "threads"):
        m = re.fullmatch(r"(\d+)x(\d+)", getattr(a, opt))
        if not m or not (1 <= int(m.group(1)) <= 256) or int(m.group(2)) < 1:
            p.error(f"--{opt}: want NxMIB, e.g. 8x64")
        setattr(a, opt, (int(m.group(1)), int(m.group(2))))
    a.modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    if a.baseline:
        a.baseline = str(Path(a.baseline).resolve())
        if not (Path(a.baseline) / "linuxcr" / "__init__.py").is_file():
            p.error(f"--baseline {a.baseline}: no linuxcr package there")
        if "base" not in a.modes:
            a.modes.insert(0, "base")
    bad = set(a.modes) - {"lcr", "lcrz", "lcragent", "api", "criu", "base"}
    if bad:
        p.error(f"unknown mode(s): {', '.join(sorted(bad))}")
    if a.runs < 1 or ("memhog" in a.cases and not a.sizes):
        p.error("need --runs >= 1 and at least one size")
    return a


def _on_term(sig, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        log("bench: warning: not root; CRIU needs root, lcr runs as yourself")
    if a.install_criu and "criu" in a.modes and not os.access(a.criu, os.X_OK):
        if os.geteuid() != 0:
            log("bench: --install-criu needs root; skipping")
        else:
            script = find_shared(a.shared) / "anchors" / "install-criu.sh"
            log(f"bench: installing CRIU with {script}")
            if subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL).returncode != 0:
                log("bench: install-criu.sh failed; CRIU measurements will be skipped")
    b = Bench(a)
    # SIGTERM/SIGINT -> normal unwinding through finally (kills our pids)
    signal.signal(signal.SIGTERM, _on_term)
    interrupted = False
    try:
        res = b.run()
    except KeyboardInterrupt:
        log("bench: interrupted; results so far:")
        interrupted = True
        res = b.result()
    finally:
        b.cleanup()
    if res is None:
        return 130
    res["meta"]["interrupted"] = interrupted
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        log(f"bench: results written to {a.json}")
    if interrupted:
        return 130
    return 0 if all(r["ok"] for r in res["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
