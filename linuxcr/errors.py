"""Every error a user can cause, as one exception class each, and its exit code.

The CLI maps each class to an exit code and prints ``str(exc)`` as one line:
the message must name the cause (pid, fd, address, kind) and, where there is
one, the way out.  Nothing else in linuxcr prints error text.

EXIT_CODES (at the end) is the one table of exit codes: `lcr --help` prints
it, README's exit-code table matches it and tests/test_layers.py checks both
(and that every class here is in it).  A class shares its code only with the
class it derives from, when it means the same thing to the user.
"""
# No `from __future__ import annotations`: tests load this file on its own
# (not in sys.modules), where dataclasses cannot resolve string annotations.
import re
import signal
from typing import Any
from dataclasses import dataclass, replace


class LcrError(Exception):
    """Base of all errors meant for the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class NoSuchProcess(LcrError):
    exit_code = 3


class PermissionDenied(LcrError):
    exit_code = 4


class UsageError(LcrError):
    """The command line is wrong (unknown option, missing argument, bad value)."""

    exit_code = 2


@dataclass(frozen=True)
class Reason:
    """Why one thing a process holds cannot be saved: what `lcr check` lists
    and NotCheckpointable carries.  ``str()`` is the one line of text the
    resource modules build (they still return strings; ``parse`` gives them
    their structure).  ``fds``: several fds that share the reason."""

    pid: int
    reason: str
    kind: str = "process"            # process | fd | memory | lock | tree
    fds: tuple[int, ...] = ()
    address: str | None = None       # "0x1000-0x2000" for a memory area
    remedy: str | None = None
    child: bool = False              # a descendant of the pid asked about

    @property
    def fd(self) -> int | None:
        return self.fds[0] if len(self.fds) == 1 else None

    def __str__(self) -> str:
        head = f"child pid {self.pid}: " if self.child else ""
        if self.fds:
            head += (f"fd {self.fds[0]}: " if len(self.fds) == 1
                     else f"fds {', '.join(map(str, self.fds))}: ")
        return head + self.reason

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "fd": self.fd, "fds": list(self.fds), "address": self.address,
                "kind": self.kind, "reason": self.reason, "remedy": self.remedy,
                "text": str(self)}

    @classmethod
    def parse(cls, pid: int, text: object) -> "Reason":
        """A reason line as the resource modules build it ("child pid N: fd
        M: why", "mapping 0xA-0xB: why", ...) as a Reason."""
        if isinstance(text, Reason):
            return text
        rest, child = str(text), False
        m = re.match(r"child pid (\d+): ", rest)
        if m:
            pid, child, rest = int(m.group(1)), True, rest[m.end():]
        fds: tuple[int, ...] = ()
        kind, address = "process", None
        m = re.match(r"fds? ([\d, ]+): ", rest)
        if m:
            fds = tuple(int(x) for x in m.group(1).split(",") if x.strip())
            kind, rest = "fd", rest[m.end():]
        else:
            m = re.search(r"\b(0x[0-9a-f]+-0x[0-9a-f]+)", rest)
            if m and re.match(r"(mapping|area|memory|\w+ 0x)", rest):
                kind, address = "memory", m.group(1)
        if kind == "fd" and "lock" in rest and "holds a file lock" in rest:
            kind = "lock"
        remedy = None
        m = re.search(r"; ((?:use|run|restart|close|give|set|checkpoint|try|stop|kill|start)\b.*)$",
                      rest)
        if m:
            remedy = m.group(1)
        return cls(pid=pid, reason=rest, kind=kind, fds=fds, address=address, remedy=remedy,
                   child=child)


def group_reasons(reasons: list[Reason]) -> list[Reason]:
    """One Reason per (pid, text) with every fd that shares it, in order of
    first appearance: fds 0, 1 and 2 on the same terminal give one line."""
    out: list[Reason] = []
    where: dict[tuple[int, bool, str, str], int] = {}
    for r in reasons:
        if not r.fds:
            out.append(r)
            continue
        key = (r.pid, r.child, r.kind, r.reason)
        if key in where:
            i = where[key]
            out[i] = replace(out[i], fds=out[i].fds + tuple(f for f in r.fds if f not in out[i].fds))
        else:
            where[key] = len(out)
            out.append(r)
    return out


class NotCheckpointable(LcrError):
    """State we cannot save.  ``reasons`` holds one line per blocking resource
    (fds that share a reason on one line), ``details`` the same as Reasons."""

    exit_code = 5

    def __init__(self, pid: int, reasons: list[str] | list[Reason]) -> None:
        self.pid = pid
        self.details = group_reasons([Reason.parse(pid, r) for r in reasons])
        self.reasons = [str(r) for r in self.details]
        head = f"pid {pid} cannot be checkpointed"
        if len(self.reasons) == 1:
            super().__init__(f"{head}: {self.reasons[0]}")
        else:
            super().__init__(f"{head}: {len(self.reasons)} problems:\n  " + "\n  ".join(self.reasons))


class ImageError(LcrError):
    """The image is corrupt, truncated, of another architecture or version."""

    exit_code = 6


class ImageWriteError(LcrError):
    """Writing the image failed (disk full, closed pipe, not writable)."""

    exit_code = 7


class RestoreError(LcrError):
    """Restart could not rebuild the process; nothing was left running."""

    exit_code = 8


class PidTaken(RestoreError):
    exit_code = 9


class TaskGone(NoSuchProcess):
    """A task exited while lcr held or worked on it (remote/task.py)."""


class Busy(LcrError):
    """Another lcr (or debugger) is already tracing the process."""

    exit_code = 10


class KernelError(LcrError):
    """A system call failed in a way the user cannot fix; names the call."""

    exit_code = 11


class RollbackRefused(LcrError):
    """The live process cannot be brought back to this snapshot (engine/snapshots.py)."""

    exit_code = 12


class AgentError(LcrError):
    """The per-user snapshot agent failed or refused a request (linuxcr/agent/)."""

    exit_code = 13


class NoTracker(AgentError):
    """The agent holds no dirty-page tracker for that process."""


class SnapshotLimit(LcrError):
    """A limit of the agent was reached: snapshots held, or the memory they hold."""

    exit_code = 14


class RolledBack(LcrError):
    """Raised by ``transaction().__enter__`` when the process comes back from
    a rollback: the state is the one before the ``with`` block."""

    exit_code = 15


class MigrationError(LcrError):
    """A migration failed (lcr migrate / receive); the source process runs on unchanged."""

    exit_code = 16


class AuthError(MigrationError):
    """The migration peers do not share the token (or speak another protocol)."""

    exit_code = 17


class KeyFileError(LcrError):
    """A --sign/--verify KEYFILE that cannot be used (image/sign.py)."""

    exit_code = 18


class GuardianUnavailable(KernelError):
    """The guardian that protects a live target from lcr's own death could
    not be started (remote/guardian.py): nothing was changed in the target."""


class ImageNotFound(ImageError):
    """The image file (or a parent of an incremental image) does not exist."""

    exit_code = 19


class NoSuchSnapshot(LcrError):
    """No in-memory checkpoint has that crid (or it was discarded)."""

    exit_code = 20


class JobError(LcrError):
    """`lcr run --checkpoint-dir`: the checkpoint directory cannot be used as asked."""

    exit_code = 21


class BadImage(ImageError):
    """`lcr run --checkpoint-dir`: DIR/latest is corrupt, incomplete or made by
    another command line."""


class GraceExceeded(LcrError):
    """`lcr run --checkpoint-dir`: the checkpoint could not finish within the
    grace budget (the command gets the signal instead)."""

    exit_code = 22


class FaultInjected(LcrError):
    """LCR_FAULT=<point>:raise reached its point (faults.py; tests only)."""


SUCCESS = 0
INTERNAL_ERROR = 70      # a bug of ours (any exception that is not an LcrError)
INTERRUPTED = 130        # ^C (SIGINT), as a shell reports it
HUNG_UP = 129            # SIGHUP (Terminated), as a shell reports a death by it
TERMINATED = 143         # SIGTERM (Terminated)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP to lcr while it works (``Terminated.arm()``): raised
    in the main thread as ^C raises KeyboardInterrupt -- of which it is a
    kind, so every cleanup ^C runs runs (the target thawed, our mappings and
    fds gone, helpers reaped) before lcr exits with 128 + the signal and one
    line, as a shell would report that death.  Not an LcrError: like ^C it
    is not a failure of the job."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.message = f"terminated by {signal.Signals(signum).name}"

    def __str__(self) -> str:
        return self.message

    @staticmethod
    def arm() -> None:
        """From now on SIGTERM and SIGHUP raise Terminated in the main thread
        (elsewhere: nothing changes).  Once: a second one while the first
        one's cleanup runs is ignored, so that cleanup is not cut short."""
        try:
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, _terminated)
        except ValueError:      # not the main thread (lcr driven from a test's thread)
            pass


_HOLD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def hold_signals() -> dict[int, Any]:
    """The job is done but for letting go of the tasks (a checkpoint's
    tree killed or thawed, a restart's restored tree detached), which ^C,
    SIGTERM or SIGHUP must not cut short half-way through a tree: ignored
    until release_signals (one arriving meanwhile is dropped: the job
    finishes, exit 0).  The handlers replaced."""
    try:
        return {s: signal.signal(s, signal.SIG_IGN) for s in _HOLD}
    except ValueError:      # not the main thread: no handler of ours runs here anyway
        return {}


def release_signals(held: dict[int, Any]) -> None:
    for s, h in held.items():
        if h is not None:
            signal.signal(s, h)


def _terminated(signum: int, _frame: object) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


# (code, class name or "-", one-line meaning): the exit codes of `lcr`.
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (SUCCESS, "-", "success"),
    (1, "LcrError", "other error"),
    (1, "FaultInjected", "a fault injected with LCR_FAULT (tests only)"),
    (2, "UsageError", "the command line is wrong (see lcr COMMAND --help)"),
    (3, "NoSuchProcess", "no such process"),
    (3, "TaskGone", "the process exited while lcr worked on it"),
    (4, "PermissionDenied", "permission denied"),
    (5, "NotCheckpointable", "the process holds something that cannot be saved"),
    (6, "ImageError", "image is corrupt, truncated, or of another version/architecture"),
    (6, "BadImage", "lcr run --checkpoint-dir: the latest image is corrupt or of another command"),
    (7, "ImageWriteError", "the image could not be written (disk full, closed pipe)"),
    (8, "RestoreError", "restart failed (nothing is left running)"),
    (9, "PidTaken", "the saved pid is taken (use --any-pid)"),
    (10, "Busy", "the process is already being traced (debugger, another lcr)"),
    (11, "KernelError", "a system call failed in a way the user cannot fix"),
    (11, "GuardianUnavailable", "the guardian process could not be started (target untouched)"),
    (12, "RollbackRefused", "rollback refused (the process or tree changed in a way it cannot undo)"),
    (13, "AgentError", "the snapshot agent failed or refused (e.g. not your crid)"),
    (13, "NoTracker", "the snapshot agent holds no write tracker for that process"),
    (14, "SnapshotLimit", "a snapshot limit was reached (count or memory per user)"),
    (15, "RolledBack", "(API) transaction(): the process came back from a rollback"),
    (16, "MigrationError", "a live migration failed (the source runs on unchanged)"),
    (17, "AuthError", "the migration peers do not share the token"),
    (18, "KeyFileError", "a --sign/--verify key file cannot be used"),
    (19, "ImageNotFound", "the image file does not exist"),
    (20, "NoSuchSnapshot", "no in-memory checkpoint has that crid"),
    (21, "JobError", "lcr run --checkpoint-dir: the directory cannot be used as asked"),
    (22, "GraceExceeded", "lcr run --checkpoint-dir: the checkpoint did not finish within --grace"),
    (INTERNAL_ERROR, "-", "internal error (a bug: run with LCR_DEBUG=1 and report it)"),
    (INTERRUPTED, "-", "interrupted (^C)"),
    (HUNG_UP, "-", "lcr checkpoint or restart: hung up (SIGHUP), cleaned up as on ^C"),
    (TERMINATED, "-", "lcr checkpoint or restart: terminated (SIGTERM), cleaned up as on ^C"),
)


def exit_code_table() -> str:
    """EXIT_CODES as aligned text lines (the epilog of `lcr --help`)."""
    width = max(len(name) for _, name, _ in EXIT_CODES)
    return "\n".join(f"{code:>4}  {name:<{width}}  {meaning}" for code, name, meaning in EXIT_CODES)
