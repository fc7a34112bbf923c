"""Small helpers shared by the /proc parsers (text decoding, raw reads)."""

from __future__ import annotations

import os


def as_text(data: str | bytes) -> str:
    """Decode /proc contents like a file name: non-UTF-8 bytes survive as surrogates.

    Paths and comm are arbitrary bytes; surrogateescape keeps them reversible
    with os.fsencode() so restore can reopen the exact same path.
    """
    if isinstance(data, str):
        return data
    return bytes(data).decode("utf-8", "surrogateescape")


def proc_path(pid: int | str, *parts: str | int) -> str:
    """Path under /proc/PID; pid may be 'self' or 'thread-self'."""
    return os.path.join("/proc", str(pid), *(str(p) for p in parts))


def read_bytes(path: str) -> bytes:
    """Read a whole /proc file; builtin OSErrors propagate unchanged."""
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def lines(text: str) -> list[str]:
    """Split on '\\n' only: str.splitlines() would also cut at \\x0b, \\x1c... in paths."""
    return [ln for ln in text.split("\n") if ln]
