"""Terminals (resources/fdkinds/pty.py): a tmux server and the program in its
pane, a program that opened /dev/ptmx itself, and a shell job (--shell-job)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import LCR, REPO, assert_clean_error, lcr, parse_restored_pid, reap

pytestmark = pytest.mark.e2e

COUNTER = """
import itertools, sys, time
for i in itertools.count():
    print("count", i, flush=True)
    time.sleep(0.05)
"""


def _until(what, fn, timeout=60.0):
    """Poll fn() until it returns something true (the tests never pass on time alone)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# tmux

@pytest.fixture
def tmux(tmp_path, procs):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    sock = tmp_path / "tmux.sock"

    def run(*args, check=True):
        return subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", *args], capture_output=True,
                              text=True, close_fds=True, stdin=subprocess.DEVNULL, check=check)
    yield run
    run("kill-server", check=False)


def _counts(tmux) -> list[int]:
    out = tmux("capture-pane", "-p", check=False).stdout
    return [int(x) for x in re.findall(r"^count (\d+)$", out, re.M)]


def test_tmux_pane_counts_on(tmux, tmp_path, procs):
    (tmp_path / "c.py").write_text(COUNTER)
    tmux("new-session", "-d", "-x", "100", "-y", "30", f"{sys.executable} {tmp_path / 'c.py'}")
    server = procs.add(int(tmux("display", "-p", "#{pid}").stdout))
    pane = int(tmux("display", "-p", "#{pane_pid}").stdout)
    procs.add(pane)
    _until("the counter", lambda: len(_counts(tmux)) > 3)
    tty = tmux("display", "-p", "#{pane_tty}").stdout.strip()
    cp = lcr("check", server, check=False)
    assert cp.returncode == 0, cp.stdout
    img = tmp_path / "img"
    lcr("checkpoint", server, "-o", img)
    reap(server)
    reap(pane)
    assert tmux("capture-pane", "-p", check=False).returncode != 0     # no server now
    lcr("restart", img)
    after = _until("the restored pane", lambda: _counts(tmux))
    last = after[-1]
    _until("the counter to go on", lambda: (_counts(tmux) or [0])[-1] > last + 5)
    # the same terminal, the same session and foreground group as before
    assert tmux("display", "-p", "#{pane_tty}").stdout.strip() == tty
    with open(f"/proc/{pane}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    pgrp, sid, tty_nr, tpgid = int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5])
    assert sid == pane and pgrp == pane and tpgid == pane, fields[:6]
    assert tty_nr != 0
    assert os.readlink(f"/proc/{pane}/fd/0") == tty
    # the window size came back: tmux resizes the pane, the program sees it
    tmux("send-keys", "-t", "0", "", check=False)
    size = subprocess.run(["stty", "-F", tty, "size"], capture_output=True, text=True).stdout.split()
    assert size == ["30", "100"] or size == ["29", "100"], size     # tmux may keep a status line


# --------------------------------------------------------------------------
# a program that opened /dev/ptmx itself: both ends, settings and bytes waiting

PTYPROG = r"""
import fcntl, os, signal, struct, sys, termios, time
m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
os.unlockpt(m) if hasattr(os, "unlockpt") else fcntl.ioctl(m, 0x40045431, struct.pack("i", 0))
n = int(os.ptsname(m).rsplit("/", 1)[1]) if hasattr(os, "ptsname") else \
    struct.unpack("i", fcntl.ioctl(m, 0x80045430, b"\0" * 4))[0]
s = os.open(f"/dev/pts/{n}", os.O_RDWR | os.O_NOCTTY)
a = termios.tcgetattr(s)
a[3] &= ~termios.ECHO                       # a password prompt, say
a[6][termios.VINTR] = b"\x07"
termios.tcsetattr(s, termios.TCSANOW, a)
fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
os.write(m, b"typed line\n")                 # waiting for the slave side
os.write(s, b"program output\n")             # waiting for the master side
signal.signal(signal.SIGUSR1, lambda *a: None)
print("READY", n, flush=True)
signal.pause()                               # checkpointed here; goes on at SIGUSR1
a = termios.tcgetattr(s)
ws = struct.unpack("HHHH", fcntl.ioctl(s, termios.TIOCGWINSZ, b"\0" * 8))
print("ECHO", bool(a[3] & termios.ECHO), "VINTR", a[6][termios.VINTR], "WS", ws[0], ws[1], flush=True)
print("SLAVE", os.read(s, 100), flush=True)
print("MASTER", os.read(m, 100), flush=True)
print("TTY", os.ttyname(s), flush=True)
"""


def _report(log, start: int) -> str:
    return _until("its report", lambda: "TTY" in log.read_text()[start:] and log.read_text()[start:])


def _check_report(text: str, idx: str) -> None:
    assert "ECHO False VINTR b'\\x07' WS 33 111" in text, text
    assert "SLAVE b'typed line\\n'" in text, text
    assert "MASTER b'program output\\r\\n'" in text or "MASTER b'program output\\n'" in text, text
    assert f"TTY /dev/pts/{idx}" in text, text          # the same index: it was free


def test_pty_leave_running_consumes_nothing(tmp_path, procs):
    """--leave-running: the bytes lcr read to save them are back where they
    were; the image restores the same."""
    (tmp_path / "p.py").write_text(PTYPROG)
    log = tmp_path / "log"
    with open(log, "ab") as out:     # O_APPEND: both runs' reports stay
        p = subprocess.Popen([sys.executable, tmp_path / "p.py"], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    procs.add(p.pid)
    idx = _until("READY", lambda: re.search(r"READY (\d+)", log.read_text())).group(1)
    img = tmp_path / "img"
    lcr("checkpoint", p.pid, "-o", img, "--leave-running")
    n = len(log.read_text())
    os.kill(p.pid, signal.SIGUSR1)
    _check_report(_report(log, n), idx)
    p.wait()
    n = len(log.read_text())
    pid = procs.add(parse_restored_pid(lcr("restart", img).stdout))
    os.kill(pid, signal.SIGUSR1)
    _check_report(_report(log, n), idx)


def test_program_with_its_own_pty(tmp_path, procs):
    (tmp_path / "p.py").write_text(PTYPROG)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, tmp_path / "p.py"], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    procs.add(p.pid)
    m = _until("READY", lambda: re.search(r"READY (\d+)", log.read_text()))
    idx = m.group(1)
    img = tmp_path / "img"
    lcr("checkpoint", p.pid, "-o", img)
    p.wait()
    pid = procs.add(parse_restored_pid(lcr("restart", img).stdout))
    assert "ECHO" not in log.read_text()
    os.kill(pid, signal.SIGUSR1)
    text = _until("its report", lambda: "TTY" in log.read_text() and log.read_text())
    assert "ECHO False VINTR b'\\x07' WS 33 111" in text, text
    assert "SLAVE b'typed line\\n'" in text, text
    assert "MASTER b'program output\\r\\n'" in text or "MASTER b'program output\\n'" in text, text
    assert f"TTY /dev/pts/{idx}" in text, text          # the same index: it was free


# --------------------------------------------------------------------------
# a shell job: checkpoint --shell-job, restart --shell-job from the shell,
# ^Z, fg, ^C through lcr

class Terminal:
    """An interactive bash on a pty of ours; everything it prints is kept."""

    def __init__(self, procs, env: dict) -> None:
        import fcntl
        import termios
        import threading
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")
        self.sh = subprocess.Popen(
            ["bash", "--norc", "--noprofile", "-i"], stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, env=env, close_fds=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        procs.add(self.sh.pid)
        self.out = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                b = os.read(self.master, 4096)
            except OSError:
                return
            if not b:
                return
            with self._lock:
                self.out += b

    def text(self, start: int = 0) -> str:
        with self._lock:
            return self.out[start:].decode(errors="replace")

    def mark(self) -> int:
        with self._lock:
            return len(self.out)

    def send(self, s: str) -> None:
        os.write(self.master, s.encode())

    def expect(self, pattern: str, start: int = 0, what: str = "") -> re.Match:
        return _until(what or pattern, lambda: re.search(pattern, self.text(start), re.M))

    def close(self) -> None:
        os.close(self.master)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_shell_job(tmp_path, procs):
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    (tmp_path / "c.py").write_text(COUNTER.replace("0.05", "0.1"))
    env = {**os.environ, "PS1": "PROMPT$ ", "PYTHONPATH": str(REPO), "TERM": "dumb",
           "HISTFILE": "/dev/null", "PROMPT_COMMAND": ""}
    term = Terminal(procs, env)
    try:
        term.expect(r"PROMPT\$ ")
        at = term.mark()
        term.send(f"{sys.executable} {tmp_path / 'c.py'}\n")
        term.expect(r"^count 3\r?$", at)
        job = _children(term.sh.pid)[0]
        procs.add(job)
        # without the flag: named and refused
        cp = lcr("check", job, check=False)
        assert cp.returncode == 5
        assert any("--shell-job" in ln and f"pid {os.getpid()}" in ln for ln in cp.stdout.splitlines()), cp.stdout
        img = tmp_path / "img"
        cp = lcr("checkpoint", job, "-o", img, check=False)
        assert_clean_error(cp, "NotCheckpointable", mentions=["--shell-job"])
        at = term.mark()
        lcr("checkpoint", job, "-o", img, "--shell-job")
        term.expect(r"PROMPT\$ ", at, "the shell's prompt after the job was killed")
        last = max(int(x) for x in re.findall(r"^count (\d+)", term.text(), re.M))
        # restart without --shell-job: refused, naming the flag
        cp = lcr("restart", img, check=False)
        assert_clean_error(cp, "RestoreError", mentions=["--shell-job"])
        # from the shell, on its terminal
        at = term.mark()
        term.send(f"{' '.join(LCR)} restart {img} --shell-job\n")
        m = term.expect(r"^count (\d+)\r?$", at, "the restored job's output")
        assert int(m.group(1)) <= last + 1, (m.group(1), last)
        term.expect(rf"^count {int(m.group(1)) + 3}\r?$", at)
        lcr_pid = next(p for p in _children(term.sh.pid))
        assert job in _children(lcr_pid)                 # same pid, lcr's child
        with open(f"/proc/{job}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[5]) == int(fields[2]) == job, fields[:6]   # foreground group
        # ^Z: the shell sees its job stopped
        at = term.mark()
        term.send("\x1a")
        term.expect(r"Stopped", at, "bash reporting the stopped job")
        _until("the job stopped", lambda: _state(job) == "T")
        seen = term.mark()
        # fg: counting again
        term.send("fg\n")
        term.expect(r"^count \d+\r?$", seen, "the job counting after fg")
        # ^C: the job ends by SIGINT, lcr with it
        at = term.mark()
        term.send("\x03")
        term.expect(r"PROMPT\$ ", at, "the prompt after ^C")
        term.send("echo rc=$?\n")
        term.expect(r"^rc=130\r?$", at)
    finally:
        term.close()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"
