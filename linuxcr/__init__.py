"""linuxcr: transparent checkpoint/restart of Linux processes, in user space."""
from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # at run time on first use (__getattr__): `lcr checkpoint` handed to the
    # agent (handoff.py) imports this package, and errors costs ~10 ms (dataclasses, re)
    from linuxcr.errors import (AgentError, AuthError, Busy, ImageError, ImageNotFound,
                                ImageWriteError, KernelError, KeyFileError, LcrError,
                                MigrationError, NoSuchProcess, NoSuchSnapshot, NotCheckpointable,
                                NoTracker, PermissionDenied, PidTaken, Reason, RestoreError,
                                RollbackRefused, RolledBack, SnapshotLimit, TaskGone, UsageError)

_ERROR_NAMES = ["AgentError", "AuthError", "Busy", "ImageError", "ImageNotFound", "ImageWriteError",
                "KernelError", "KeyFileError", "LcrError", "MigrationError", "NoSuchProcess",
                "NoSuchSnapshot", "NotCheckpointable", "NoTracker", "PermissionDenied", "PidTaken",
                "Reason", "RestoreError", "RollbackRefused", "RolledBack", "SnapshotLimit",
                "TaskGone", "UsageError"]
_FUNCTIONS = ["checkpoint", "restart", "restart_full", "check", "check_full", "run", "snapshot",
              "snapshots", "writeback", "rollback", "discard", "transaction", "show", "tracking"]
_RESULTS = ["CheckpointResult", "RestartResult", "RunResult", "SnapshotInfo", "WritebackResult",
            "RollbackResult", "DiscardResult", "CheckResult", "Tracking"]
_SELF = ["checkpoint_self", "before_checkpoint", "after_restore"]

__all__ = [*_FUNCTIONS, *_RESULTS, *_ERROR_NAMES, *_SELF, "__version__"]

# The public API comes from linuxcr.api, imported on first use (PEP 562): every
# `lcr` command imports this package, and api imports every engine and resource
# module, which `lcr --version` or `lcr show` do not need (start-up time).
_API = frozenset(_FUNCTIONS)
_ERRORS = frozenset(_ERROR_NAMES)
_SUBMODULES = frozenset({"agent", "api", "cli", "cli_common", "cli_migrate", "engine", "errors", "faults",
                         "image", "job", "migration", "periodic", "pipeline", "procfs", "remote",
                         "resources", "selfckpt", "sys"})


def __getattr__(name: str) -> object:
    import importlib
    if name in _ERRORS:
        value = getattr(importlib.import_module("linuxcr.errors"), name)
    elif name in _API:
        value = getattr(importlib.import_module("linuxcr.api"), name)
    elif name in _RESULTS:
        value = getattr(importlib.import_module("linuxcr.results"), name)
    elif name in _SELF:           # self-checkpoint and hooks (linuxcr/selfckpt.py)
        value = getattr(importlib.import_module("linuxcr.selfckpt"), name)
    elif name in _SUBMODULES:     # `import linuxcr; linuxcr.api.check(...)` as before
        value = importlib.import_module(f"linuxcr.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API | set(_RESULTS) | _ERRORS)
