#!/usr/bin/env python3
"""bench.py -- linuxcr checkpoint/restart benchmark, with CRIU and
process_vm_readv measured in the same run for reference.

    python3 bench/bench.py [--sizes 256,1024] [--runs 3] [--json out.json]
                           [--modes lcr,api,criu] [--dir /var/tmp/lcr-bench]
                           [--install-criu] [--no-prewarm] [--keep-images]

Workload: the shared memhog (N MiB of incompressible private anonymous memory,
a running checksum, answers SIGUSR1 with "counter=N ... OK|MISMATCH").

For every size and every run, one step per mode, in an order that rotates
from run to run (interleaving):

  lcr    `lcr checkpoint PID -o IMG` and `lcr restart IMG` as subprocesses
         (wall clock around each, interpreter start-up included)
  lcrz   the same with `--compress`
  api    linuxcr.checkpoint(pid, IMG) / linuxcr.restart(IMG) timed inside a
         long-lived worker interpreter that imported linuxcr beforehand (no
         start-up cost; the worker is separate so that a crash or hang of the
         engine cannot take the benchmark with it)
  criu   `criu dump -t PID -D DIR`, `criu restore -d -D DIR` (as
         shared/anchors/bench-criu.sh does), when the criu binary exists
  pvr    `rawbw pvr PID ADDR BYTES 4096 3` on a fresh memhog: the
         process_vm_readv throughput, i.e. the copy limit of a checkpointer

Each checkpoint/restart step: start memhog, probe (SIGUSR1), sync + pre-warm
(write and delete a scratch file of size+64 MiB, untimed), time the
checkpoint, wait until /proc/PID is gone, measure the image, pre-warm, time
the restart, probe again.  The step is OK only if the checksum matches and
the counter advanced; a failed step is reported as FAIL and is not timed.
Medians are over the OK runs.  Every process started here is killed by pid.
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
    """Compile memhog and rawbw from the (read-only) shared dir into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    res = {}
    for name in ("memhog", "rawbw"):
        src = shared / "workloads" / f"{name}.c"
        exe = out / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run([cc, "-O2", "-g", "-Wall", "-Wextra", "-o", str(exe), str(src)], check=True)
        res[name] = exe
    return res


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


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def last_line(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------- workload


class Memhog:
    def __init__(self, exe: Path, mib: int, logfile: Path):
        self.exe, self.mib, self.log = exe, mib, logfile
        self.pid = 0
        self.addr = 0

    def start(self) -> int:
        self.log.unlink(missing_ok=True)
        r = subprocess.run([str(self.exe), "-o", str(self.log), str(self.mib)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        m = re.match(r"(\d+) ready", r.stdout)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"memhog {self.mib} failed: {r.stdout!r} {r.stderr!r}")
        self.pid = int(m.group(1))
        m = re.search(r"addr=(0x[0-9a-f]+)", self.log.read_text())
        self.addr = int(m.group(1), 16) if m else 0
        return self.pid

    def _lines(self) -> list[str]:
        try:
            return [l for l in self.log.read_text(errors="replace").splitlines() if "counter=" in l]
        except OSError:
            return []

    def probe(self, pid: int | None = None, timeout: float = 60.0) -> tuple[int, str]:
        """SIGUSR1 -> (counter, 'OK'|'MISMATCH'|'DEAD'|'NOREPLY')."""
        pid = pid or self.pid
        n = len(self._lines())
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return 0, "DEAD"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self._lines()
            if len(lines) > n:
                line = lines[-1]
                m = re.search(r"counter=(\d+)", line)
                st = "OK" if line.rstrip().endswith(" OK") else "MISMATCH"
                return int(m.group(1)), st
            if not proc_alive(pid):
                return 0, "DEAD"
            time.sleep(0.02)
        return 0, "NOREPLY"


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
        self.shared = find_shared(args.shared)
        self.exe = build_workloads(self.shared, self.root / "bin")
        self.live: set[int] = set()          # pids we started and have not seen gone
        self.lcr = shlex.split(args.lcr) if args.lcr else [sys.executable, "-m", "linuxcr"]
        self.criu = args.criu
        self.crit = args.crit
        self.worker = ApiWorker(args.timeout, self.root / "api-worker.log") if "api" in args.modes else None
        self.records: list[dict] = []
        self.meta: dict | None = None
        self.modes: list[str] = []

    # ---- process bookkeeping
    def kill(self, pid: int, reaper=None) -> None:
        if pid and proc_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pid and wait_gone(pid, reaper=reaper):
            self.live.discard(pid)

    def cleanup(self) -> None:
        for pid in sorted(self.live):
            self.kill(pid, reaper=self.worker.reap if self.worker else None)
        if self.worker:
            self.worker.stop()

    def run_cmd(self, argv, save: Path | None = None, **kw):
        """-> (rc or None on timeout, wall seconds, stdout, stderr); SAVE.{out,err} kept."""
        t = time.perf_counter()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=self.a.timeout, **kw)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = None, "", f"timeout after {self.a.timeout:.0f}s: {' '.join(map(str, argv[:4]))}"
        dt = time.perf_counter() - t
        if save is not None:
            Path(str(save) + ".cmd").write_text(shlex.join(map(str, argv)) + f"\nrc={rc} {dt:.4f}s\n")
            Path(str(save) + ".out").write_text(out or "")
            Path(str(save) + ".err").write_text(err or "")
        return rc, dt, out, err

    # ---- one mode's checkpoint + restart
    def ckpt(self, mode, pid, img):
        """-> (ok, seconds, error)"""
        if mode in ("lcr", "lcrz"):
            argv = self.lcr + ["checkpoint", str(pid), "-o", str(img)]
            if mode == "lcrz":
                argv.append("--compress")
            rc, dt, out, err = self.run_cmd(argv, save=img.parent / "checkpoint")
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

    def restart(self, mode, img, pid):
        """-> (ok, seconds, restored_pid, error)"""
        if mode in ("lcr", "lcrz"):
            rc, dt, out, err = self.run_cmd(self.lcr + ["restart", str(img)], save=img.parent / "restart")
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

    def step(self, mode: str, mib: int, run: int) -> dict:
        d = self.root / f"{mib}.{run}.{mode}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        img = d / ("img" if mode == "criu" else "image.lcr")
        rec = {"size_mib": mib, "run": run, "mode": mode, "ok": False, "verify": "FAIL",
               "ckpt_s": None, "restart_s": None, "img_bytes": None, "error": None}
        reaper = self.worker.reap if mode == "api" else None
        hog = Memhog(self.exe["memhog"], mib, d / "memhog.log")
        pid = rpid = 0
        try:
            pid = hog.start()
            self.live.add(pid)
            rec["pid"] = pid
            c0, s0 = hog.probe()
            if s0 != "OK":
                raise StepFail(f"memhog probe before checkpoint: {s0}")
            if self.a.prewarm:
                os.sync()
                prewarm(self.root, mib + 64)
            ok, dt, err = self.ckpt(mode, pid, img)
            if not ok:
                raise StepFail(err)
            rec["ckpt_wall_s"] = dt
            if not wait_gone(pid, self.a.gone_timeout):
                raise StepFail(f"pid {pid} still exists {self.a.gone_timeout:.0f}s after checkpoint "
                               "(not killed, or not reaped)")
            self.live.discard(pid)
            rec["img_bytes"] = tree_bytes(img)
            if self.a.prewarm:
                prewarm(self.root, mib + 64)
            # the restore brings the process back at its saved pid: count it as
            # ours from now on, so an interrupt during the restore still kills it
            self.live.add(pid)
            ok, rt, rpid, err = self.restart(mode, img, pid)
            if rpid:
                self.live.add(rpid)
            if not ok:
                raise StepFail(err)
            rec["restored_pid"] = rpid
            c1, s1 = hog.probe(rpid)
            rec["counter"] = [c0, c1]
            if s1 != "OK" or c1 <= c0:
                raise StepFail(f"verify after restart: {s1} counter {c0}->{c1}")
            rec.update(ok=True, verify="OK", ckpt_s=dt, restart_s=rt)
            if mode == "criu":
                rec["crit"] = self.crit_stats(img)
        except StepFail as e:
            rec["error"] = str(e)
        except Exception as e:  # harness trouble: report, go on
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            for p in (rpid, pid):
                if p in self.live:
                    self.kill(p, reaper)
            if not self.a.keep_images:
                shutil.rmtree(img, ignore_errors=True) if img.is_dir() else img.unlink(missing_ok=True)
        return rec

    def pvr_step(self, mib: int, run: int) -> dict:
        d = self.root / f"{mib}.{run}.pvr"
        d.mkdir(parents=True, exist_ok=True)
        hog = Memhog(self.exe["memhog"], mib, d / "memhog.log")
        rec = {"size_mib": mib, "run": run, "mode": "pvr", "ok": False, "error": None}
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
            "sizes_mib": a.sizes, "runs": a.runs, "modes": modes, "prewarm": a.prewarm, "pvr": a.pvr,
            "dir": str(self.root),
        }
        log(f"# kernel {meta['kernel']}, {meta['cpus']} cpus, python {meta['python']}, "
            f"criu {meta['criu']}, images in {self.root}")
        self.meta, self.modes = meta, modes
        meta["startup"] = self.startup()
        steps = modes + (["pvr"] if a.pvr else [])
        for mib in a.sizes:
            for run in range(1, a.runs + 1):
                k = (run - 1) % len(steps)
                for mode in steps[k:] + steps[:k]:           # rotate: interleave the tools
                    if mode == "pvr":
                        rec = self.pvr_step(mib, run)
                        self.records.append(rec)
                        log(f"  {mib:5d} MiB run {run} pvr   " + (
                            f"{rec['gib_s']:.2f} GiB/s" if rec["ok"] else f"FAIL {rec['error']}"))
                        continue
                    rec = self.step(mode, mib, run)
                    self.records.append(rec)
                    if rec["ok"]:
                        log(f"  {mib:5d} MiB run {run} {mode:5s} checkpoint {rec['ckpt_s']*1e3:8.1f} ms  "
                            f"restart {rec['restart_s']*1e3:8.1f} ms  image {rec['img_bytes']/MiB:7.1f} MiB  OK")
                    else:
                        log(f"  {mib:5d} MiB run {run} {mode:5s} FAIL: {rec['error']}")
        return self.result()

    def result(self) -> dict | None:
        if self.meta is None:
            return None
        return {"meta": self.meta, "records": self.records, "summary": self.summarize(self.modes)}

    def _criu_version(self):
        try:
            r = subprocess.run([self.criu, "--version"], capture_output=True, text=True, timeout=30)
            m = re.search(r"Version:\s*(\S+)", r.stdout)
            return m.group(1) if m else r.stdout.strip()
        except Exception as e:
            return f"? ({e})"

    def summarize(self, modes) -> dict:
        out = {}
        for mib in self.a.sizes:
            recs = [r for r in self.records if r["size_mib"] == mib]
            pv = [r for r in recs if r["mode"] == "pvr" and r["ok"]]
            pvr_bps = median([r["bytes_per_s"] for r in pv])
            s = {"pvr_bytes_per_s": pvr_bps, "pvr_runs": len(pv), "modes": {}}
            for mode in modes:
                rs = [r for r in recs if r["mode"] == mode]
                ok = [r for r in rs if r["ok"]]
                m = {"ok": len(ok), "runs": len(rs),
                     "ckpt_s": median([r["ckpt_s"] for r in ok]),
                     "restart_s": median([r["restart_s"] for r in ok]),
                     "img_bytes": median([r["img_bytes"] for r in ok]),
                     "errors": sorted({r["error"] for r in rs if r["error"]})}
                # checkpoint throughput in image bytes/s (per run, then median)
                m["ckpt_bytes_per_s"] = median([r["img_bytes"] / r["ckpt_s"] for r in ok if r["ckpt_s"]])
                m["ckpt_vs_pvr"] = (m["ckpt_bytes_per_s"] / pvr_bps
                                    if m["ckpt_bytes_per_s"] and pvr_bps else None)
                s["modes"][mode] = m
            c = s["modes"].get("criu")
            ratios = {}
            for mode in modes:
                if mode == "criu" or not c:
                    continue
                m = s["modes"][mode]
                ratios[mode] = {
                    "ckpt_vs_criu": m["ckpt_s"] / c["ckpt_s"] if m["ckpt_s"] and c["ckpt_s"] else None,
                    "restart_vs_criu": (m["restart_s"] / c["restart_s"]
                                        if m["restart_s"] and c["restart_s"] else None),
                }
            s["ratios"] = ratios
            out[str(mib)] = s
        return out


class StepFail(Exception):
    pass


# ---------------------------------------------------------------------- report


def fmt(v, spec, scale=1.0, none="-"):
    return none if v is None else format(v * scale, spec)


def report(res: dict) -> str:
    L = []
    meta = res["meta"]
    st = meta.get("startup", {})
    L.append(f"# linuxcr bench {meta['date']}  kernel {meta['kernel']}  {meta['cpus']} cpus  "
             f"python {meta['python']}  criu {meta['criu'] or '-'}  runs={meta['runs']}  "
             f"prewarm={meta['prewarm']}")
    L.append(f"# interpreter start-up: python -c pass {fmt(st.get('python_s'), '.0f', 1e3)} ms, "
             f"import linuxcr.cli {fmt(st.get('import_linuxcr_cli_s'), '.0f', 1e3)} ms"
             + (f" ({st['import_linuxcr_cli_error']})" if st.get("import_linuxcr_cli_error") else ""))
    L.append("# medians over OK runs; ckpt GiB/s = image bytes / checkpoint time; "
             "/pvr = that / process_vm_readv GiB/s")
    L.append("")
    hdr = f"{'size':>6} {'tool':6} {'ok':>5} {'ckpt ms':>9} {'restart ms':>10} {'image MiB':>9} " \
          f"{'ckpt GiB/s':>10} {'/pvr':>6} {'ckpt/CRIU':>9} {'rst/CRIU':>9}"
    L.append(hdr)
    L.append("-" * len(hdr))
    for size, s in res["summary"].items():
        for mode, m in s["modes"].items():
            r = s["ratios"].get(mode, {})
            L.append(f"{size:>6} {mode:6} {m['ok']:>2}/{m['runs']:<2} {fmt(m['ckpt_s'], '9.1f', 1e3):>9} "
                     f"{fmt(m['restart_s'], '10.1f', 1e3):>10} {fmt(m['img_bytes'], '9.1f', 1 / MiB):>9} "
                     f"{fmt(m['ckpt_bytes_per_s'], '10.2f', 1 / GiB):>10} {fmt(m['ckpt_vs_pvr'], '6.2f'):>6} "
                     f"{fmt(r.get('ckpt_vs_criu'), '9.2f'):>9} {fmt(r.get('restart_vs_criu'), '9.2f'):>9}")
        if not meta.get("pvr", True):
            continue
        L.append(f"{size:>6} {'pvr':6} {s['pvr_runs']:>2}/{meta['runs']:<2} "
                 f"process_vm_readv {fmt(s['pvr_bytes_per_s'], '.2f', 1 / GiB)} GiB/s (rawbw pvr, 4 MiB chunks, best of 3)")
    errs = [(size, mode, e) for size, s in res["summary"].items()
            for mode, m in s["modes"].items() for e in m["errors"]]
    if errs:
        L.append("")
        L.append("# failures (distinct messages)")
        for size, mode, e in errs:
            L.append(f"  {size} MiB {mode}: {e}")
    return "\n".join(L)


# ------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,1024", help="memhog sizes in MiB, comma separated (default 256,1024)")
    p.add_argument("--runs", type=int, default=3, help="runs per size and tool (default 3)")
    p.add_argument("--modes", default="lcr,api,criu",
                   help="tools to time, comma separated: lcr (CLI), lcrz (CLI --compress), "
                        "api (Python API, warm interpreter), criu (default lcr,api,criu)")
    p.add_argument("--no-pvr", dest="pvr", action="store_false", help="skip the process_vm_readv limit")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false", help="do not pre-warm memory")
    p.add_argument("--dir", default="/var/tmp/lcr-bench", help="work dir for images and logs (local disk)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    p.add_argument("--shared", help="the shared/ dir holding workloads/ and anchors/ (auto)")
    p.add_argument("--lcr", help="lcr command line (default: '<this python> -m linuxcr')")
    p.add_argument("--criu", default=os.environ.get("CRIU", "/opt/criu-trixie/criu"))
    p.add_argument("--crit", default=os.environ.get("CRIT", "/opt/criu-trixie/crit"))
    p.add_argument("--criu-v", type=int, default=2, help="criu log level (default 2)")
    p.add_argument("--install-criu", action="store_true",
                   help="run shared/anchors/install-criu.sh first if criu is missing (root)")
    p.add_argument("--timeout", type=float, default=600, help="per command timeout, s")
    p.add_argument("--gone-timeout", type=float, default=30, help="wait for a dumped pid to vanish, s")
    p.add_argument("--keep-images", action="store_true", help="keep the images (default: delete)")
    a = p.parse_args(argv)
    a.sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    a.modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    bad = set(a.modes) - {"lcr", "lcrz", "api", "criu"}
    if bad:
        p.error(f"unknown mode(s): {', '.join(sorted(bad))}")
    if a.runs < 1 or not a.sizes:
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
