"""Parser for /proc/PID/auxv: native (x86_64) little-endian u64 (type, value) pairs."""

from __future__ import annotations

import struct

from ._text import proc_path, read_bytes

AT_NULL = 0
AT_PHDR = 3
AT_PHENT = 4
AT_PHNUM = 5
AT_PAGESZ = 6
AT_BASE = 7
AT_ENTRY = 9
AT_HWCAP = 16
AT_CLKTCK = 17
AT_SECURE = 23
AT_RANDOM = 25
AT_HWCAP2 = 26
AT_EXECFN = 31
AT_SYSINFO_EHDR = 33  # vDSO base
AT_MINSIGSTKSZ = 51

_PAIR = struct.Struct("<QQ")


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    """Pairs up to (excluding) AT_NULL; bytes after AT_NULL are ignored."""
    if len(data) % _PAIR.size:
        raise ValueError(f"auxv length {len(data)} is not a multiple of {_PAIR.size}")
    pairs: list[tuple[int, int]] = []
    for key, value in _PAIR.iter_unpack(data):
        if key == AT_NULL:
            break
        pairs.append((key, value))
    return pairs


def read_auxv(pid: int | str) -> bytes:
    """Raw auxv up to and including the AT_NULL pair: what restore writes back."""
    data = read_bytes(proc_path(pid, "auxv"))
    whole = len(data) - len(data) % _PAIR.size
    n = len(parse_auxv(data[:whole]))
    return data[: min(whole, (n + 1) * _PAIR.size)]
