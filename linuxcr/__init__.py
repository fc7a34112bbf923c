"""linuxcr: transparent checkpoint/restart of Linux processes, in user space."""
from __future__ import annotations

__version__ = "0.1.0"

from linuxcr.api import checkpoint, restart, check  # noqa: E402

__all__ = ["checkpoint", "restart", "check", "__version__"]
