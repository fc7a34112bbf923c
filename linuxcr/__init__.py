"""linuxcr: transparent checkpoint/restart of Linux processes, in user space."""
from __future__ import annotations

__version__ = "0.1.0"

from linuxcr.api import (  # noqa: E402
    check, checkpoint, restart, run, snapshot, snapshots, transaction,
)

__all__ = ["checkpoint", "restart", "check", "run", "snapshot", "snapshots", "transaction",
           "__version__"]
