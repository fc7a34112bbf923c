"""Running `lcr run --checkpoint-dir` jobs in tests (test_job.py, test_selfckpt.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import helpers

JOB_PROG = helpers.PROGS_DIR / "job_count.py"


@dataclass
class Job:
    popen: subprocess.Popen
    out: Path          # the command's output, relayed by lcr
    err: Path          # lcr's own lines
    out_start: int
    err_start: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def out_text(self) -> str:
        return helpers.read_log(self.out, self.out_start)

    def err_text(self) -> str:
        return helpers.read_log(self.err, self.err_start)

    def wait_out(self, pattern: str) -> re.Match:
        return helpers.wait_for_line(self.out, pattern, start=self.out_start, pid=self.pid)

    def wait_err(self, pattern: str) -> re.Match:
        return helpers.wait_for_line(self.err, pattern, start=self.err_start, pid=self.pid)

    def command_pid(self) -> int:
        m = self.wait_err(r"\(pid (\d+)\)")
        return int(m.group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = helpers.LCR_TIMEOUT) -> int:
        os.kill(self.pid, sig)
        return self.wait(timeout)

    def wait(self, timeout: float = helpers.LCR_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lcr job pid {self.pid} did not exit; its stderr:\n"
                                 f"{self.err_text()}") from None


def start_job(procs: helpers.Procs, ckdir: Path, logs: Path, argv: list, *opts: str,
              env: dict | None = None) -> Job:
    """lcr run --checkpoint-dir ckdir OPTS -- ARGV, its stdout/stderr appended
    to logs/out and logs/err; registered in procs (lcr and the command)."""
    out, err = logs / "out", logs / "err"
    o0 = out.stat().st_size if out.exists() else 0
    e0 = err.stat().st_size if err.exists() else 0
    with open(out, "ab") as fo, open(err, "ab") as fe:
        p = subprocess.Popen([*helpers.LCR, "run", "--checkpoint-dir", str(ckdir), *opts, "--",
                              *(str(a) for a in argv)],
                             stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, close_fds=True,
                             env=env if env is not None else helpers.child_env())
    procs._tracked.append(helpers._Tracked(p.pid, helpers.start_time(p.pid), p))
    job = Job(p, out, err, o0, e0)
    return job


def track_command(procs: helpers.Procs, job: Job) -> int:
    """The command's host pid (from lcr's 'started'/'resumed' line), killed at teardown."""
    pid = job.command_pid()
    procs.add(pid)
    return pid


def py_job(*args: str) -> list:
    return [sys.executable, str(JOB_PROG), *args]


def counts(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"^count (\d+)", text, re.M)]
