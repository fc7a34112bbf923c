"""Pseudo-terminals: a pty pair held inside the tree (a tmux or screen server
and the programs in its panes, an expect-style parent driving a child, a
program that opened /dev/ptmx itself), and the terminal lcr is called from
(--shell-job).

Two kinds: "ptmx" (the master end) and "pts" (a slave end, /dev/pts/N).

Dump.  The master's ioctls reach the terminal's settings (termios, window
size, session, foreground group live on the slave side; the kernel answers
TCGETS, TIOCGWINSZ, TIOCGSID, TIOCGPGRP asked through the master): so all
is read through our copy of the master (pidfd_getfd), plus packet mode and
the lock.  The bytes waiting in each direction are read (typed and not yet
read by the slave side: through a slave of our own; written and not yet
read by the master side: through our copy of the master) and put straight
back the way they came (echo and output processing off meanwhile), so a
process left running (or thawed after a failure) sees them all the same.
A slave records which session has it as controlling terminal and its
foreground group (from /proc/PID/stat of its holder).

Restore.  lcr opens /dev/ptmx until it gets the saved index (devpts hands
out the lowest free one; if the saved one is taken, the first one it got),
unlocks it, opens the slave, sets termios and window size, writes the
waiting bytes back (raw meanwhile), sets packet mode and the lock; each
slave description is a new open of /dev/pts/NEW.  Inside each task, once
its fds are in place (after_install), the session leader makes the slave
its controlling terminal (TIOCSCTTY) and sets the foreground group
(TIOCSPGRP); the process groups exist by then (pstree.set_groups).

A slave whose master is outside the tree is the terminal of a shell job:
refused unless ``lcr checkpoint --shell-job``; restart then needs
``--shell-job`` too and hands the job lcr's own terminal (engine/foreground.py
puts it in the foreground).  A master whose slave is also held outside the
tree is refused: checkpoint a common ancestor.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import re
import struct
import termios
from dataclasses import dataclass
from typing import Iterable, Iterator

from linuxcr.errors import LcrError, NotCheckpointable, RestoreError
from linuxcr.image.kinds_tty import MAX_QUEUED, PtmxState, PtsState
from linuxcr.procfs import list_fds, read_fd_link, read_fdinfo, read_stat, read_status

TIOCGPTN, TIOCSPTLCK, TIOCGPTLCK = 0x80045430, 0x40045431, 0x80045439
TIOCPKT, TIOCGPKT = 0x5420, 0x80045438
TIOCSCTTY, TIOCSPGRP, TIOCGPGRP, TIOCGSID = 0x540E, 0x5410, 0x540F, 0x5429
TIOCGWINSZ, TIOCSWINSZ, FIONREAD = 0x5413, 0x5414, 0x541B
MASTERS = ("/dev/ptmx", "/dev/pts/ptmx")
SLAVE = re.compile(r"^/dev/pts/(\d+)$")
ECHOES = termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ECHOCTL | termios.ECHOKE
IN_XLATE = termios.ICRNL | termios.INLCR | termios.IGNCR | termios.ISTRIP | termios.IXON | termios.IUCLC
MAX_TRIES = 4096            # opens of /dev/ptmx while looking for the saved index
SHELL_JOB = "--shell-job"


# --- options (--shell-job) --------------------------------------------------------

_SHELL_JOB: contextvars.ContextVar[bool] = contextvars.ContextVar("lcr_shell_job", default=False)


@contextlib.contextmanager
def options(*, shell_job: bool = False) -> Iterator[None]:
    tok = _SHELL_JOB.set(shell_job)
    try:
        yield
    finally:
        _SHELL_JOB.reset(tok)


def shell_job() -> bool:
    return _SHELL_JOB.get()


# --- small helpers ---------------------------------------------------------------------

def _ioctl_int(fd: int, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]


def _set_int(fd: int, req: int, v: int) -> None:
    fcntl.ioctl(fd, req, struct.pack("i", v))


def _waiting(fd: int) -> int:
    try:
        return _ioctl_int(fd, FIONREAD)
    except OSError:
        return 0


def _drain(fd: int, packet: bool = False) -> bytes:
    """What is waiting on fd, without ever blocking (FIONREAD says how much;
    a canonical slave gives a line per read)."""
    out = b""
    while len(out) < MAX_QUEUED:
        n = _waiting(fd)
        if n <= 0:
            break
        chunk = os.read(fd, min(n + (1 if packet else 0), MAX_QUEUED - len(out) + 1))
        if not chunk:
            break
        if packet:     # packet mode: a status byte first; 0 means data follows
            if chunk[0] != 0:
                continue       # a status event (flush, stop/start): not data
            chunk = chunk[1:]
        out += chunk
    return out


def _attrs(state: PtmxState) -> list:
    return [state.iflag, state.oflag, state.cflag, state.lflag, state.ispeed, state.ospeed,
            list(state.cc)]      # tcsetattr takes every special character as an int


def _inject(master: int, slave: int, attrs: list, to_slave: bytes, to_master: bytes) -> None:
    """Put waiting bytes back into a pty: typed ones through the master
    (echo and input translation off, so they arrive as they were read),
    written ones through the slave (output processing off); then the
    saved settings."""
    if to_slave:
        quiet = list(attrs)
        quiet[0] &= ~IN_XLATE
        quiet[3] &= ~(ECHOES | termios.ISIG | termios.IEXTEN)
        termios.tcsetattr(master, termios.TCSANOW, quiet)
        os.write(master, to_slave)
    if to_master:
        raw = list(attrs)
        raw[1] &= ~termios.OPOST
        raw[3] &= ~(ECHOES | termios.ISIG | termios.IEXTEN)
        termios.tcsetattr(master, termios.TCSANOW, raw)
        os.write(slave, to_master)
    termios.tcsetattr(master, termios.TCSANOW, attrs)


def _ns_pid(host_pid: int) -> int:
    """A pid (or pgid, sid) as the tree's processes number it."""
    if host_pid <= 0:
        return 0
    try:
        return read_status(host_pid).ns_pid[-1]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return host_pid


def _tty_nr(rdev: int) -> int:
    ma, mi = os.major(rdev), os.minor(rdev)
    return (mi & 0xFF) | (ma << 8) | ((mi & ~0xFF) << 12)


# --- the kinds ----------------------------------------------------------------------------

class Ptmx:
    name = "ptmx"

    def matches(self, ctx) -> bool:
        return ctx.link in MASTERS

    def reason(self, ctx) -> str | None:
        if "tty-index" not in ctx.info.extra:
            return f"pty master {ctx.link}: its index is not in fdinfo (kernel too old)"
        return None

    def dump(self, ctx) -> PtmxState:
        m = ctx.grab()
        index = _ioctl_int(m, TIOCGPTN)
        a = termios.tcgetattr(m)
        rows, cols, xp, yp = struct.unpack("HHHH", fcntl.ioctl(m, TIOCGWINSZ, b"\0" * 8))
        packet, locked = bool(_ioctl_int(m, TIOCGPKT)), bool(_ioctl_int(m, TIOCGPTLCK))
        to_master = _drain(m, packet)
        to_slave = b""
        s = -1
        if not locked:
            try:
                s = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                s = -1
        try:
            if s >= 0:
                to_slave = _drain(s)
                _inject(m, s, a, to_slave, to_master)       # put back: inspect, never consume
            elif to_master:
                raise NotCheckpointable(ctx.pid, [f"fd {ctx.fd}: pty /dev/pts/{index} is locked "
                                                  "and holds output: cannot put it back"])
        finally:
            if s >= 0:
                os.close(s)
        return PtmxState(index=index, iflag=a[0], oflag=a[1], cflag=a[2], lflag=a[3], ispeed=a[4],
                         ospeed=a[5], cc=bytes(c[0] if isinstance(c, bytes) else c for c in a[6]),
                         rows=rows, cols=cols, xpixel=xp, ypixel=yp, packet=packet, locked=locked,
                         to_slave=to_slave, to_master=to_master)

    def open(self, state: PtmxState, flags: int) -> int:
        p = _pair(state.index)
        if p.configured:
            raise RestoreError(f"pty master of /dev/pts/{state.index} is in the image twice")
        s = os.open(f"/dev/pts/{p.index}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if state.rows or state.cols:
                fcntl.ioctl(p.master, TIOCSWINSZ,
                            struct.pack("HHHH", state.rows, state.cols, state.xpixel, state.ypixel))
            _inject(p.master, s, _attrs(state), state.to_slave, state.to_master)
        except OSError as e:
            raise RestoreError(f"cannot set up pty /dev/pts/{p.index}: {e.strerror}") from None
        finally:
            os.close(s)
        if state.packet:
            _set_int(p.master, TIOCPKT, 1)
        p.locked = state.locked
        if state.locked:
            _set_int(p.master, TIOCSPTLCK, 1)
        p.configured = True
        os.set_blocking(p.master, not flags & os.O_NONBLOCK)
        return os.dup(p.master)


class Pts:
    name = "pts"

    def matches(self, ctx) -> bool:
        return SLAVE.match(ctx.link) is not None

    def reason(self, ctx) -> str | None:
        return None          # external or not: decided for the whole tree (tree_reasons)

    def dump(self, ctx) -> PtsState:
        index = int(SLAVE.match(ctx.link).group(1))
        sid = pgrp = 0
        try:
            st = read_stat(ctx.pid)
            if st.tty_nr == _tty_nr(ctx.st.st_rdev):     # its session's controlling terminal
                sid, pgrp = _ns_pid(st.session), _ns_pid(st.tpgid)
        except (FileNotFoundError, ProcessLookupError):
            pass
        return PtsState(index=index, ctty_sid=sid, fg_pgrp=pgrp)

    def open(self, state: PtsState, flags: int) -> int:
        if state.external:
            return _shell_tty(flags)
        p = _pair(state.index)
        try:
            if p.locked:
                _set_int(p.master, TIOCSPTLCK, 0)
            fd = os.open(f"/dev/pts/{p.index}", (flags & os.O_ACCMODE) | os.O_NOCTTY | os.O_CLOEXEC)
            if p.locked:
                _set_int(p.master, TIOCSPTLCK, 1)
        except OSError as e:
            raise RestoreError(f"cannot open /dev/pts/{p.index}: {e.strerror}") from None
        os.set_blocking(fd, not flags & os.O_NONBLOCK)
        return fd

    def after_install(self, t, arena, fd: int, state: PtsState, fds) -> None:
        """In the session leader: the controlling terminal, the foreground group."""
        if state.external or not state.ctty_sid:
            return
        me = t.syscall("getpid")
        if me != state.ctty_sid or t.syscall("getsid", 0) != me:
            return
        try:
            t.syscall("ioctl", fd, TIOCSCTTY, 0)
            if state.fg_pgrp:
                t.syscall("ioctl", fd, TIOCSPGRP, arena.put(struct.pack("i", state.fg_pgrp)))
        except OSError as e:
            raise RestoreError(f"pid {me}: cannot make /dev/pts/{state.index} its controlling "
                               f"terminal (foreground group {state.fg_pgrp}): {e.strerror}") from None


PTMX, PTS = Ptmx(), Pts()


# --- the pairs lcr makes at restore ------------------------------------------------------

@dataclass
class _Pair:
    master: int
    index: int
    locked: bool = False
    configured: bool = False


_PAIRS: dict[int, _Pair] = {}


def _pair(saved: int) -> _Pair:
    """The pair made for saved index ``saved``: the same index where free."""
    if saved in _PAIRS:
        return _PAIRS[saved]
    taken: list[int] = []
    keep = -1
    try:
        for _ in range(MAX_TRIES):
            fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            idx = _ioctl_int(fd, TIOCGPTN)
            if idx == saved or idx > saved:
                keep = fd if idx == saved or not taken else taken.pop(0)
                if keep != fd:
                    os.close(fd)
                break
            taken.append(fd)
        else:
            keep = taken.pop(0)
    except OSError as e:
        raise RestoreError(f"cannot open a new pty (/dev/ptmx): {e.strerror}") from None
    finally:
        for fd in taken:
            os.close(fd)
    _set_int(keep, TIOCSPTLCK, 0)
    p = _PAIRS[saved] = _Pair(keep, _ioctl_int(keep, TIOCGPTN))
    return p


def release() -> None:
    """lcr's own copies of the masters it made (the tasks hold theirs)."""
    for p in _PAIRS.values():
        try:
            os.close(p.master)
        except OSError:
            pass
    _PAIRS.clear()


def _shell_tty(flags: int) -> int:
    """--shell-job: the terminal restart runs on."""
    if not shell_job():
        raise RestoreError("the image's shell job needs a terminal", f"restart with {SHELL_JOB}")
    for fd in (0, 1, 2):
        if os.isatty(fd):
            t = os.open(os.ttyname(fd), (flags & os.O_ACCMODE) | os.O_NOCTTY | os.O_CLOEXEC)
            return t
    raise RestoreError(f"lcr restart {SHELL_JOB} is not running on a terminal",
                       "run it from the terminal the job should come back on")


# --- the tree as a whole ------------------------------------------------------------------

@dataclass
class _End:
    pid: int
    fd: int
    index: int


def _ends(pids: Iterable[int]) -> tuple[list[_End], list[_End]]:
    masters, slaves = [], []
    for pid in pids:
        try:
            fds = list_fds(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for fd in fds:
            try:
                link = read_fd_link(pid, fd)
                if link in MASTERS:
                    idx = read_fdinfo(pid, fd).extra.get("tty-index")
                    if idx is not None:
                        masters.append(_End(pid, fd, int(idx)))
                elif (m := SLAVE.match(link)):
                    slaves.append(_End(pid, fd, int(m.group(1))))
            except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
                continue
    return masters, slaves


def _outside(inside: set[int]) -> tuple[list[_End], list[_End]]:
    others = [int(p) for p in os.listdir("/proc")
              if p.isdigit() and int(p) not in inside and int(p) != os.getpid()]
    return _ends(others)


def _who(ends: list[_End]) -> str:
    def comm(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return "?"
    return ", ".join(f"pid {e.pid} ({comm(e.pid)}) fd {e.fd}" for e in ends[:3]) or "a process lcr cannot see"


def tree_reasons(pids: Iterable[int], root: int) -> list[str]:
    """Terminals whose other end is outside the tree (see the module doc)."""
    inside = set(pids)
    masters, slaves = _ends(inside)
    if not masters and not slaves:
        return []
    have = {m.index for m in masters}
    lone = [s for s in slaves if s.index not in have]
    out_m, out_s = _outside(inside) if (lone and not shell_job()) or masters else ([], [])
    out = []

    def who(e: _End, fds: str = "") -> str:
        fds = fds or f"fd {e.fd}"
        return fds if e.pid == root else f"child pid {e.pid}: {fds}"
    if not shell_job():
        groups: dict[tuple[int, int], list[_End]] = {}
        for s in lone:      # one line per process and terminal: "fd 0, 1, 2: terminal ..."
            groups.setdefault((s.pid, s.index), []).append(s)
        for same in groups.values():
            s = same[0]
            held = [m for m in out_m if m.index == s.index]
            fds = ("fds " if len(same) > 1 else "fd ") + ", ".join(str(e.fd) for e in same)
            out.append(f"{who(s, fds)}: terminal /dev/pts/{s.index}, whose other end is held outside "
                       f"the tree by {_who(held)}: checkpoint with {SHELL_JOB} (and restart with "
                       f"{SHELL_JOB} on a terminal)")
    for m in masters:
        used = [s for s in out_s if s.index == m.index]
        if used:
            out.append(f"{who(m)}: pty master of /dev/pts/{m.index}, whose terminal is also used "
                       f"outside the tree by {_who(used)}: checkpoint a common ancestor")
    return out


def mark(table) -> None:
    """Slaves whose master is not in the image: the shell job's terminal
    (--shell-job), marked external in their saved state."""
    have = {d.state.index for d in table.descs if d.kind == "ptmx"}
    for d in table.descs:
        if d.kind == "pts" and d.state.index not in have:
            if not shell_job():
                raise LcrError(f"terminal /dev/pts/{d.state.index} leads outside the tree",
                               f"checkpoint with {SHELL_JOB}")
            d.state = PtsState(index=d.state.index, ctty_sid=0, fg_pgrp=0, external=True)


def check_restart(descs, tasks) -> None:
    """Before anything is opened: a shell job's terminal needs --shell-job."""
    ext = {d.fid for d in descs if d.kind == "pts" and d.state is not None and d.state.external}
    if ext and not shell_job():
        k, f = next((k, f) for k in tasks for f in k.files if f.fid in ext)
        raise RestoreError(f"pid {k.vpid or k.pid} fd {f.fd} was the terminal of a shell job",
                           f"restart with {SHELL_JOB} from the terminal it should run on")
