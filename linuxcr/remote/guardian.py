"""A guardian that survives lcr and puts a live target back if lcr dies.

lcr changes live targets only while it holds them under ptrace: registers
(an injected syscall), signal mask (all blocked during a call), a scratch
mapping, fds it creates inside (the write tracker's userfaultfd), a forked
snapshot child.  If lcr is SIGKILLed (or OOM-killed) the kernel detaches its
tracees: they would run on with what lcr left.  Two things prevent that:

- remote/task.py keeps a thread-directed SIGSTOP pending in every thread lcr
  has changed (SIGSTOP cannot be blocked): a detached thread group-stops on
  its way back to user mode before running one instruction of its own, or it
  sleeps in pause() with every signal blocked (the "parking" call);
- this guardian, forked from lcr before its first change to a live target,
  reads a journal of each change *before* it is made.  On end-of-file with
  changes outstanding (lcr died), it waits until the kernel has detached the
  tasks, seizes them, puts registers and masks back, unmaps the scratch
  mappings, closes fds lcr made, kills half-made snapshot children, lets the
  threads go and sends SIGCONT (unless the process was stopped before).

The journal is one JSON object per line on a pipe (each line < PIPE_BUF, so
written atomically: a line cut short by lcr's death is ignored, which is safe
because an entry always precedes the change it describes).  When lcr exits
normally the pipe closes with nothing outstanding and the guardian just exits.

``ensure()`` gives the process-wide Journal (guardian started on first use);
``start()`` starts one explicitly.  A rollback (engine/snapshots.py) starts
its own with a ``complete`` hook and journals ``begin`` before its first
change and ``done`` when complete: lcr dead in between, the guardian calls
the hook, which finishes the rollback, instead of putting the old state back.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from linuxcr.errors import GuardianUnavailable, KernelError, LcrError

UNTRACED_WAIT = 10.0      # seconds to wait for the kernel to detach a dead lcr's tracees


# --- lcr's side ---------------------------------------------------------------

class Journal:
    """lcr's end of the pipe to its guardian."""

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.guardian_pid = pid
        self.owner = os.getpid()

    def _send(self, **entry) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        assert len(line) < 4096, "journal entries must be atomic pipe writes"
        try:
            os.write(self.fd, line)
        except OSError as e:
            raise GuardianUnavailable(f"the guardian (pid {self.guardian_pid}) is gone: {e.strerror}",
                                      "nothing more is changed in the target; try again") from None

    def process(self, pid: int, *, stopped: bool, fds: list[int], starttime: int) -> None:
        """Before the first change to ``pid``: what to compare with."""
        self._send(op="proc", pid=pid, stopped=stopped, fds=_ranges(fds), start=starttime)

    def thread(self, pid: int, tid: int, regs: bytes, mask: int) -> None:
        """Before the first change to thread ``tid``: its own registers and mask."""
        self._send(op="thread", pid=pid, tid=tid, regs=regs.hex(), mask=mask)

    def mapping(self, pid: int, addr: int, length: int, cookie: bytes, insn: int) -> None:
        """Before mmap: the scratch range (fixed address), the cookie written
        into it (how a half-made snapshot child is recognised) and the
        syscall instruction the guardian can use."""
        self._send(op="map", pid=pid, addr=addr, len=length, cookie=cookie.hex(), insn=insn)

    def unmapped(self, pid: int, addr: int) -> None:
        self._send(op="unmap", pid=pid, addr=addr)

    def child(self, pid: int, cpid: int) -> None:
        """A snapshot child exists (kill it if lcr dies before owning it)."""
        self._send(op="child", pid=pid, cpid=cpid)

    def owned(self, pid: int, cpid: int) -> None:
        """The child carries PTRACE_O_EXITKILL now: the kernel kills it with lcr."""
        self._send(op="owned", pid=pid, cpid=cpid)

    def release(self, pid: int, tid: int) -> None:
        """Sent just before letting ``tid`` go: its registers and mask are its
        own from here on, nothing of ours is left in the process."""
        self._send(op="release", pid=pid, tid=tid)

    def end(self, pid: int) -> None:
        """Every thread of ``pid`` let go (or the process killed by design)."""
        self._send(op="end", pid=pid)

    def begin(self, pid: int) -> None:
        """A rollback (engine/snapshots.py) is about to change the processes
        held: from here on, if lcr dies, the guardian's ``complete`` finishes
        it instead of putting the old state back (which memory rewritten
        since would contradict)."""
        self._send(op="begin", pid=pid)

    def done(self, pid: int) -> None:
        """The rollback is complete; the journal (threads re-sent) describes
        the rolled-back state: a death from here is put back as usual."""
        self._send(op="done", pid=pid)

    def close(self) -> None:
        """Nothing outstanding: the guardian exits; reap it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.waitpid(self.guardian_pid, 0)
            except ChildProcessError:
                pass


def _ranges(fds: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for fd in sorted(fds):
        if out and out[-1][1] == fd - 1:
            out[-1][1] = fd
        else:
            out.append([fd, fd])
    return out


_journal: Journal | None = None


def ensure() -> Journal:
    """The guardian of this lcr process, started on first use."""
    global _journal
    if _journal is None or _journal.owner != os.getpid():
        _journal = start()
    return _journal


# What a guardian with a ``complete`` hook calls if lcr dies with something
# outstanding: (the processes still held, whether a rollback was begun) ->
# what it did, in words.  It runs in the guardian, a fork of lcr: it sees
# lcr's memory as it was at the fork (the snapshot a rollback needs).
Complete = Callable[[dict[int, "Proc"], bool], str]


def start(complete: Complete | None = None, keep: tuple[int, ...] = ()) -> Journal:
    """Fork a guardian; GuardianUnavailable (before any change) if we cannot.
    ``complete``: see Complete; ``keep``: fds of lcr the guardian keeps open
    until it is done (the agent's lock: no new agent starts meanwhile)."""
    r = w = -1
    # ^C, SIGTERM, SIGHUP held back over the fork: their handler (raising
    # KeyboardInterrupt or errors.Terminated) run inside an at-fork hook
    # (logging's) would be swallowed there, and lcr would go on as if no
    # signal had come.  Delivered right after, in lcr's own code.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, QUIET)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        raise GuardianUnavailable(f"cannot start the guardian process that protects the target: "
                                  f"{e.strerror}", "nothing was changed; free some memory or "
                                  "processes and try again") from None
    if pid == 0:
        code = 0
        try:
            for s in QUIET:
                signal.signal(s, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(w)
            _guardian_main(r, complete, keep)
        except BaseException:
            code = 1
        os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(r)
    return Journal(w, pid)


QUIET = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


# --- the guardian's side --------------------------------------------------------

@dataclass
class Proc:
    pid: int
    stopped: bool
    fds: set[int]
    starttime: int
    threads: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    released: set[int] = field(default_factory=set)
    maps: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    insn: int | None = None
    children: set[int] = field(default_factory=set)


def _guardian_main(r: int, complete: Complete | None = None, keep: tuple[int, ...] = ()) -> None:
    """Read the journal until EOF; then put back whatever is outstanding
    (or, a rollback begun, have ``complete`` finish it)."""
    os.setsid()                  # not in lcr's process group or session
    os.environ.pop("LCR_FAULT", None)    # lcr's fault points are lcr's, not ours
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    _close_others(keep={r, 2, *keep})
    state: dict = {}
    procs = _read_journal(r, state)
    if not procs:
        return
    if complete is not None:
        try:
            what = complete(procs, bool(state.get("begun")))
        except Exception as e:       # never a traceback; say what we could not do
            what = f"could not finish what it had begun: {e}"
        if what:
            os.write(2, f"lcr guardian: lcr died while it held pid(s) "
                        f"{', '.join(map(str, sorted(procs)))}; {what}\n".encode())
        return
    for p in procs.values():
        try:
            what = recover(p)
        except Exception as e:       # never a traceback; say what we could not do
            what = f"could not put it back: {e}"
        if what:
            os.write(2, f"lcr guardian: pid {p.pid}: lcr died while it held the process; "
                        f"{what}\n".encode())


def _close_others(keep: set[int]) -> None:
    from linuxcr.sys.syscalls import close_all_but
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        if fd not in keep:
            os.dup2(devnull, fd)
    os.close(devnull)
    close_all_but(keep)


def _read_journal(r: int, state: dict) -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    buf = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            _apply(procs, json.loads(line), state)
    return procs            # a last line without its newline was never acted on


def _apply(procs: dict[int, Proc], e: dict, state: dict) -> None:
    op, pid = e["op"], e["pid"]
    if op in ("begin", "done"):
        state["begun"] = op == "begin"
        return
    if op == "proc":
        fds = {fd for a, b in e["fds"] for fd in range(a, b + 1)}
        procs[pid] = Proc(pid, e["stopped"], fds, e["start"])
        return
    p = procs.get(pid)
    if p is None:
        return
    if op == "thread":
        p.threads[e["tid"]] = (bytes.fromhex(e["regs"]), e["mask"])
        p.released.discard(e["tid"])
    elif op == "map":
        p.maps[e["addr"]] = (e["len"], bytes.fromhex(e["cookie"]))
        p.insn = e["insn"]
    elif op == "unmap":
        p.maps.pop(e["addr"], None)
    elif op == "child":
        p.children.add(e["cpid"])
    elif op == "owned":
        p.children.discard(e["cpid"])
    elif op == "release":
        p.released.add(e["tid"])
    elif op == "end":
        del procs[pid]


def recover(p: Proc) -> str:
    """Put process ``p`` back as the journal says it was; what was done, in words."""
    from linuxcr.procfs import read_stat
    from linuxcr.remote.task import Tracee
    from linuxcr.sys import ptrace
    from linuxcr.sys.syscalls import user_regs_struct

    try:
        if read_stat(p.pid).starttime != p.starttime:
            return ""                     # gone, its pid reused
    except (FileNotFoundError, ProcessLookupError):
        return ""
    wait_untraced(p.pid)
    stopped = stopped_now(p.pid)             # group-stopped by our pending SIGSTOP
    held: list[Tracee] = []
    released = False
    done: list[str] = []
    try:
        for tid, (regs, mask) in sorted(p.threads.items()):
            if tid in p.released or not os.path.exists(f"/proc/{p.pid}/task/{tid}"):
                continue
            t = Tracee(tid)
            t.tgid = p.pid
            t.seize()
            held.append(t)
            t.stop()
            t.saved_regs = user_regs_struct.from_buffer_copy(regs)
            t.own_mask = mask
            ptrace.set_regs(tid, t.saved_regs)
            ptrace.set_sigmask(tid, mask)
            t.prime()                     # the same safe scheme, should we die too
        if held:
            done.append(f"registers and signal mask of {len(held)} thread(s) restored")
        leader = next((t for t in held if t.pid == p.pid), held[0] if held else None)
        if leader is not None and p.insn is not None:
            for t in held:
                t.insn = p.insn
            done += _undo_in(leader, p)
        for t in held:
            t.release()
        released, held = bool(held), []
    finally:
        for t in held:                    # a failure: at least let them go
            try:
                t.detach()
            except OSError:
                pass
    if not p.stopped and (stopped or released):
        # a thread let go in a group-stopped process stops again, later:
        # whether it will cannot be seen yet, so SIGCONT whenever it may
        os.kill(p.pid, signal.SIGCONT)
        done.append("SIGCONT sent")
    return "; ".join(done) or ""


def _undo_in(t, p: Proc) -> list[str]:
    """Inside the held process: scratch mappings, fds and children of ours."""
    done = []
    kids = set(p.children) | _cookie_children(p)
    for cpid in kids:
        try:
            os.kill(cpid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        done.append(f"snapshot child {cpid} killed")
    for addr, (length, _cookie) in p.maps.items():
        t.syscall("munmap", addr, length, check=False)
        done.append(f"scratch mapping 0x{addr:x} removed")
    if p.released:
        return done               # lcr had finished its cleanup before letting any thread go
    extra = sorted(int(fd) for fd in os.listdir(f"/proc/{p.pid}/fd") if int(fd) not in p.fds)
    for fd in extra:
        t.syscall("close", fd, check=False)
    if extra:
        done.append(f"fds {extra} closed")
    for cpid in kids:             # a child of the target with no exit signal: reap it
        if _wait_zombie(cpid, p.pid):
            t.syscall("wait4", cpid, 0, 1 | 0x40000000, 0, check=False)   # WNOHANG|__WALL
    return done


def _cookie_children(p: Proc) -> set[int]:
    """Forks of the target made by lcr whose pid it never learned: a child
    of the target or of its parent holding our scratch cookie."""
    from linuxcr.procfs import read_stat
    from linuxcr.sys.syscalls import process_vm_readv
    if not p.maps:
        return set()
    try:
        parents = {p.pid, read_stat(p.pid).ppid}
    except (FileNotFoundError, ProcessLookupError):
        return set()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == p.pid:
            continue
        try:
            st = read_stat(int(name))
        except (OSError, ValueError):
            continue
        if st.ppid not in parents or st.starttime < p.starttime:
            continue
        for addr, (length, cookie) in p.maps.items():
            buf = bytearray(len(cookie))
            try:
                if process_vm_readv(int(name), buf, addr + length - 4096 + COOKIE_AT) == len(buf) \
                        and bytes(buf) == cookie:
                    found.add(int(name))
            except OSError:
                pass
    return found


COOKIE_AT = 64      # offset of the cookie in the scratch mapping's code page


def _wait_zombie(cpid: int, parent: int) -> bool:
    from linuxcr.procfs import read_stat
    for _ in range(1000):
        try:
            st = read_stat(cpid)
        except (FileNotFoundError, ProcessLookupError):
            return False
        if st.ppid != parent:
            return False
        if st.state == "Z":
            return True
        time.sleep(0.002)
    return False


def _tracer(tid_dir: str) -> int:
    try:
        with open(f"{tid_dir}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_untraced(pid: int) -> None:
    """lcr's tracees are detached in its exit (exit_ptrace), after it closed
    the journal: wait for that, or seizing them would fail."""
    deadline = time.monotonic() + UNTRACED_WAIT
    while time.monotonic() < deadline:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return
        if all(_tracer(f"/proc/{pid}/task/{t}") == 0 for t in tids):
            return
        time.sleep(0.001)
    raise KernelError(f"pid {pid} is still traced {UNTRACED_WAIT:.0f} s after lcr died")


def stopped_now(pid: int) -> bool:
    from linuxcr.procfs import read_stat
    try:
        return any(read_stat(int(t)).state == "T" for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return False


__all__ = ["Journal", "Proc", "Complete", "ensure", "start", "recover", "wait_untraced",
           "stopped_now", "GuardianUnavailable", "COOKIE_AT"]
