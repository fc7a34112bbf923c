"""Parsers for /proc/PID/maps and /proc/PID/smaps.

Lines look like (path column padded to 73 on 64-bit kernels):
    7ffe9f9f3000-7ffe9fa14000 rw-p 00000000 00:00 0                          [stack]
The path is everything after the inode field, so it may contain spaces; the
kernel escapes only '\\n' (as '\\012') and appends ' (deleted)' for unlinked files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._text import as_text, lines, proc_path, read_bytes

DELETED_SUFFIX = " (deleted)"
_PATH_COLUMN = 73  # 25 + sizeof(void *) * 6 - 1, plus the separating space
_HEADER_RE = re.compile(
    r"([0-9a-fA-F]+)-([0-9a-fA-F]+) ([-r][-w][-x][sp]) ([0-9a-fA-F]+) "
    r"([0-9a-fA-F]+):([0-9a-fA-F]+) ([0-9]+)(?: +(.*))?$",
    re.DOTALL,
)


@dataclass(frozen=True)
class MapEntry:
    """One VMA as shown in /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. 'r-xp'
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str  # ' (deleted)' stripped, '\\012' decoded to '\\n'
    deleted: bool = False

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def special(self) -> bool:
        """Kernel-named area: [heap], [stack], [vdso], [anon:name], ..."""
        return self.path.startswith("[")

    @property
    def is_anon(self) -> bool:
        """No backing file: plain anonymous memory or a kernel-named area."""
        return self.inode == 0 and not self.path.startswith("/")

    def line(self) -> str:
        """Format back into a maps line exactly as the kernel would (no newline)."""
        head = (
            f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x} "
            f"{self.dev_major:02x}:{self.dev_minor:02x} {self.inode} "
        )
        name = self.path.replace("\n", "\\012") + (DELETED_SUFFIX if self.deleted else "")
        if not name:
            return head
        return head.ljust(_PATH_COLUMN - 1) + " " + name


def parse_maps_line(line: str) -> MapEntry:
    """Parse one maps line; ValueError if it is not one."""
    m = _HEADER_RE.match(line)
    if m is None:
        raise ValueError(f"not a maps line: {line!r}")
    start, end, perms, off, major, minor, inode, path = m.groups()
    path = (path or "").replace("\\012", "\n")
    deleted = path.endswith(DELETED_SUFFIX)
    if deleted:
        path = path[: -len(DELETED_SUFFIX)]
    return MapEntry(
        start=int(start, 16),
        end=int(end, 16),
        perms=perms,
        offset=int(off, 16),
        dev_major=int(major, 16),
        dev_minor=int(minor, 16),
        inode=int(inode),
        path=path,
        deleted=deleted,
    )


def parse_maps(text: str | bytes) -> list[MapEntry]:
    """Parse the whole of /proc/PID/maps."""
    return [parse_maps_line(ln) for ln in lines(as_text(text))]


def read_maps(pid: int | str) -> list[MapEntry]:
    return parse_maps(read_bytes(proc_path(pid, "maps")))


@dataclass(frozen=True)
class SmapsEntry:
    """One VMA of /proc/PID/smaps: the maps header plus its counters."""

    map: MapEntry
    fields: dict[str, int] = field(default_factory=dict, hash=False)  # 'N kB' lines, in bytes
    vmflags: frozenset[str] = frozenset()  # e.g. {'rd', 'wr', 'mr', 'ac'}
    thp_eligible: int | None = None
    protection_key: int | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # any other line, raw


def _is_smaps_header(line: str) -> bool:
    return _HEADER_RE.match(line) is not None


def _smaps_entry(header: str, body: list[str]) -> SmapsEntry:
    fields: dict[str, int] = {}
    extra: dict[str, str] = {}
    vmflags: frozenset[str] = frozenset()
    for ln in body:
        key, _, value = ln.partition(":")
        value = value.strip()
        if key == "VmFlags":
            vmflags = frozenset(value.split())
        elif value.endswith(" kB") and value[:-3].strip().isdigit():
            fields[key] = int(value[:-3]) * 1024
        else:
            extra[key] = value
    return SmapsEntry(
        map=parse_maps_line(header),
        fields=fields,
        vmflags=vmflags,
        thp_eligible=_opt_int(extra.pop("THPeligible", None)),
        protection_key=_opt_int(extra.pop("ProtectionKey", None)),
        extra=extra,
    )


def _opt_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse_smaps(text: str | bytes) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps: a maps header line followed by 'Key: value' lines."""
    entries: list[SmapsEntry] = []
    header: str | None = None
    body: list[str] = []
    for ln in lines(as_text(text)):
        if _is_smaps_header(ln):
            if header is not None:
                entries.append(_smaps_entry(header, body))
            header, body = ln, []
        elif header is None:
            raise ValueError(f"smaps field before any mapping: {ln!r}")
        else:
            body.append(ln)
    if header is not None:
        entries.append(_smaps_entry(header, body))
    return entries


def read_smaps(pid: int | str) -> list[SmapsEntry]:
    return parse_smaps(read_bytes(proc_path(pid, "smaps")))
