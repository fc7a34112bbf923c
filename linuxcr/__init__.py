"""linuxcr: transparent checkpoint/restart of Linux processes, in user space."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["checkpoint", "restart", "check", "run", "snapshot", "snapshots", "transaction",
           "checkpoint_self", "before_checkpoint", "after_restore", "__version__"]
_SELF = frozenset({"checkpoint_self", "before_checkpoint", "after_restore"})

# The public API comes from linuxcr.api, imported on first use (PEP 562): every
# `lcr` command imports this package, and api imports every engine and resource
# module, which `lcr --version` or `lcr show` do not need (start-up time).
_API = frozenset(__all__) - {"__version__"} - _SELF
_SUBMODULES = frozenset({"agent", "api", "cli", "cli_common", "cli_migrate", "engine", "errors", "faults",
                         "image", "job", "migration", "periodic", "pipeline", "procfs", "remote",
                         "resources", "selfckpt", "sys"})


def __getattr__(name: str):
    import importlib
    if name in _API:
        value = getattr(importlib.import_module("linuxcr.api"), name)
    elif name in _SELF:           # self-checkpoint and hooks (linuxcr/selfckpt.py)
        value = getattr(importlib.import_module("linuxcr.selfckpt"), name)
    elif name in _SUBMODULES:     # `import linuxcr; linuxcr.api.check(...)` as before
        value = importlib.import_module(f"linuxcr.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
