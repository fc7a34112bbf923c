"""Every error a user can cause, as one exception class each.

The CLI maps each class to an exit code and prints ``str(exc)`` as one line:
the message must name the cause (pid, fd, address, kind) and, where there is
one, the way out.  Nothing else in linuxcr prints error text.
"""
from __future__ import annotations


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


class NotCheckpointable(LcrError):
    """State we cannot save.  ``reasons`` holds one line per blocking resource."""

    exit_code = 5

    def __init__(self, pid: int, reasons: list[str]) -> None:
        self.pid = pid
        self.reasons = list(reasons)
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


class Busy(LcrError):
    """Another lcr (or debugger) is already tracing the process."""

    exit_code = 10


class KernelError(LcrError):
    """A system call failed in a way the user cannot fix; names the call."""

    exit_code = 11


class MigrationError(LcrError):
    """A migration failed (lcr migrate / receive); the source process runs on unchanged."""

    exit_code = 16


class AuthError(MigrationError):
    """The migration peers do not share the token (or speak another protocol)."""

    exit_code = 17
