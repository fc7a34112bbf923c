"""Files under /proc/PID/ (stat, status, maps, the fd/ directory, ...) of a
task of the saved tree: reopened inside the restored task against the
restored process, so the program reads its own (or its relative's) data
again -- not the data of whatever process has the old pid now.

Dump: the pid in the path (as lcr's /proc names it: the fd must belong to
the /proc mount lcr sees), the rest of the path below /proc/PID, whether it
is the holder's own pid (and /task/PID/ of its own main thread), and the
file position.  The target must be a process of the saved tree
(files.Table.check_refs, like pidfds); `lcr check` refuses a target outside
the holder's session, a target that has exited, another thread's
/proc/PID/task/TID/ and a file of another /proc mount.
Restore: open() gives a stand-in (O_PATH of /); after_install, inside the
task, opens /proc/self/REST (its own files: right in a new pid namespace and
with --any-pid) or /proc/HOSTPID/REST of the restored target (found through
a pidfd the task opens on the pid it knows), seeks to the saved position
and puts the result on the saved fd number.  Each fd gets its own open
file description (the offset of a /proc file is rebuilt per fd).
"""
from __future__ import annotations

import os
import re
import stat

from linuxcr.errors import ImageError, RestoreError
from linuxcr.image.kinds import ProcfileState
from linuxcr.procfs import read_fdinfo, read_status
from linuxcr.resources.fdkinds.pidfd import restored

_PATH = re.compile(r"^/proc/(\d+)(/[^\0]*)?$")
_TASK = re.compile(r"^/task/(\d+)(/.*)?$")
O_PATH, O_CLOEXEC = os.O_PATH, 0o2000000
F_GETFD, FD_CLOEXEC, SEEK_SET = 1, 1, 0
MAGIC = ("root", "cwd", "exe", "fd", "map_files", "ns")   # magic links out of /proc
REOPEN = os.O_ACCMODE | os.O_NONBLOCK | os.O_DIRECTORY | O_PATH | os.O_NOFOLLOW | os.O_LARGEFILE


def _proc_dev() -> int:
    return os.stat("/proc").st_dev


def _parse(link: str) -> tuple[int, str] | None:
    m = _PATH.match(link)
    return (int(m.group(1)), m.group(2) or "") if m else None


def _seen_by(holder: int, host: int) -> int:
    """``host`` (a pid in lcr's namespace) as ``holder`` sees it; 0: not at all."""
    depth = len(read_status(holder).ns_pid or (0,)) - 1
    ns = read_status(host).ns_pid or (host,)
    return ns[depth] if depth < len(ns) else 0


class Procfile:
    name = "procfile"

    def matches(self, ctx) -> bool:
        return ctx.link.startswith("/proc/") and _parse(ctx.link) is not None and \
            ctx.st.st_dev == _proc_dev()

    def reason(self, ctx) -> str | None:
        target, rest = _parse(ctx.link)
        what = f"/proc file {ctx.link}"
        t = _TASK.match(rest)
        if t and int(t.group(1)) != target:
            return (f"{what}: a file of thread {t.group(1)}, not of a process: only a process's "
                    "own /proc files (and its main thread's) are reopened; close it before the "
                    "checkpoint")
        if target == ctx.pid:
            return None
        try:
            seen = _seen_by(ctx.pid, target)
            outside = os.getsid(target) != os.getsid(ctx.pid)
        except (FileNotFoundError, ProcessLookupError):
            return (f"{what}: pid {target} has exited, the file reads nothing any more; close it "
                    "before the checkpoint")
        if seen == 0 or outside:
            return (f"{what}: a file of pid {target}, which is not part of this process tree: "
                    "only /proc files of processes checkpointed with it are reopened; "
                    "checkpoint a common ancestor, or close it before the checkpoint")
        return None

    def dump(self, ctx) -> ProcfileState:
        target, rest = _parse(ctx.link)
        own = target == ctx.pid
        t = _TASK.match(rest)
        return ProcfileState(rest=rest, own=own, pid=ctx.pid if own else _seen_by(ctx.pid, target),
                             host_pid=-1 if own else target, thread=bool(t),
                             ftype=stat.S_IFMT(ctx.st.st_mode), pos=max(ctx.info.pos, 0))

    def open(self, state: ProcfileState, flags: int) -> int:
        """A stand-in; the real file is opened inside the task (after_install)."""
        return os.open("/", O_PATH | O_CLOEXEC)

    def after_install(self, t, arena, fd: int, state: ProcfileState, table) -> None:
        d = table[fd]
        path = self._path(t, fd, state)
        new = arena.open(path, d.flags & REOPEN, what=f"fd {fd}, a /proc file")
        try:
            st = os.stat(f"/proc/{t.pid}/fd/{new}")
            if stat.S_IFMT(st.st_mode) != state.ftype:
                raise RestoreError(f"fd {fd}: {path} is not the kind of /proc file it was")
            if state.pos and not d.flags & O_PATH:
                try:
                    t.syscall("lseek", new, state.pos, SEEK_SET)
                except OSError as e:
                    raise RestoreError(f"fd {fd}: cannot seek {path} to {state.pos}: "
                                       f"{e.strerror}") from None
            cloexec = t.syscall("fcntl", fd, F_GETFD) & FD_CLOEXEC
            t.syscall("dup3", new, fd, O_CLOEXEC if cloexec else 0)
        finally:
            t.syscall("close", new)

    def _path(self, t, fd: int, state: ProcfileState) -> str:
        """Where the task finds the file now."""
        parts = state.rest.split("/")[1:]
        below = parts[2:] if state.thread else parts       # (below /task/TID)
        if state.rest and (state.rest[0] != "/" or any(p in ("", ".", "..") for p in parts)) or \
                state.thread and not _TASK.match(state.rest) or \
                len(below) > 1 and below[0] in MAGIC:     # a path never goes through these
            raise ImageError(f"image holds a /proc file of fd {fd} with a bad path {state.rest!r}")
        sub = state.rest
        if state.thread:         # /task/PID/REST of the main thread: keep REST
            parts = state.rest.split("/", 3)
            sub = "/" + parts[3] if len(parts) > 3 else ""
        if state.own:            # the injected calls run in the main thread
            return ("/proc/thread-self" if state.thread else "/proc/self") + sub
        host = self._host(t, fd, state.pid)
        return f"/proc/{host}/task/{host}{sub}" if state.thread else f"/proc/{host}{sub}"

    def _host(self, t, fd: int, pid: int) -> int:
        """The restored process the task knows as ``pid``, as lcr's /proc names it."""
        try:
            pfd = t.syscall("pidfd_open", pid, 0)
        except OSError as e:
            raise RestoreError(f"fd {fd}: pid {pid}, whose /proc file it held, is not there: "
                               f"{e.strerror}", "was it restarted with --any-pid?") from None
        try:
            if not restored(t.pid, pfd):
                raise RestoreError(f"fd {fd}: pid {pid}, whose /proc file it held, is not a "
                                   "restored process (the tasks did not get their pids back)",
                                   "restart without --any-pid")
            ns = read_fdinfo(t.pid, pfd).extra.get("NSpid", "")
            return int(ns.split()[0])
        finally:
            t.syscall("close", pfd)


KIND = Procfile()
