"""Parser for /proc/PID/fdinfo/FD plus the fd-table helpers.

Common lines are pos (decimal), flags (OCTAL), mnt_id, ino; the rest depends
on the file kind (eventfd-count, tfd for epoll, inotify wd, timerfd it_value,
lock, ...) and some keys repeat (one 'tfd' per epoll target), so every line
is also kept in order in `lines`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ._text import as_text, lines, proc_path, read_bytes

_COMMON = ("pos", "flags", "mnt_id", "ino")
# Lines of the form "inotify wd:1 ino:..." have no 'key:' up front.
_WORD_KEYS = ("inotify ", "fanotify ")


@dataclass(frozen=True)
class FdInfo:
    pos: int
    flags: int  # open flags, O_* bits (printed in octal by the kernel)
    mnt_id: int = 0
    ino: int = 0
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # other keys, first occurrence
    lines: tuple[tuple[str, str], ...] = ()  # every (key, value) line in order

    def values(self, key: str) -> tuple[str, ...]:
        """All values of a key that may repeat (e.g. 'tfd', 'inotify', 'lock')."""
        return tuple(v for k, v in self.lines if k == key)


def _split_line(line: str) -> tuple[str, str]:
    for word in _WORD_KEYS:
        if line.startswith(word):
            return word.strip(), line[len(word) :].strip()
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def parse_fdinfo(text: str | bytes) -> FdInfo:
    """Parse one fdinfo file; ValueError if pos/flags are missing or malformed."""
    pairs = tuple(_split_line(ln) for ln in lines(as_text(text)))
    first: dict[str, str] = {}
    for key, value in pairs:
        first.setdefault(key, value)
    try:
        return FdInfo(
            pos=int(first["pos"]),
            flags=int(first["flags"], 8),
            mnt_id=int(first.get("mnt_id", "0")),
            ino=int(first.get("ino", "0")),
            extra={k: v for k, v in first.items() if k not in _COMMON},
            lines=pairs,
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"bad fdinfo: {e}") from None


def read_fdinfo(pid: int | str, fd: int) -> FdInfo:
    return parse_fdinfo(read_bytes(proc_path(pid, "fdinfo", fd)))


def list_fds(pid: int | str) -> list[int]:
    """Open descriptors of a process, sorted."""
    return sorted(int(name) for name in os.listdir(proc_path(pid, "fd")) if name.isdigit())


def read_fd_link(pid: int | str, fd: int) -> str:
    """Target of /proc/PID/fd/FD: a path, or 'pipe:[123]', 'anon_inode:[eventfd]', ..."""
    return os.readlink(proc_path(pid, "fd", fd))


def fd_links(pid: int | str) -> list[tuple[int, str]]:
    """(fd, target of /proc/PID/fd/FD) of every open descriptor, sorted: a
    process that is gone (or not ours to read) has none; an fd closed
    meanwhile is left out."""
    try:
        names = os.listdir(proc_path(pid, "fd"))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            out.append((int(name), os.readlink(proc_path(pid, "fd", name))))
        except (OSError, ValueError):
            continue
    return sorted(out)


# Lines some kinds of file add to their fdinfo (parsed here, like all /proc text).
EPOLL_TFD = re.compile(r"^(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)"
                  r"(?:\s+pos:\s*(-?\d+)\s+ino:\s*([0-9a-fA-F]+)\s+sdev:\s*([0-9a-fA-F]+))?")


def epoll_watches(info: FdInfo) -> list[tuple[int, int, int]]:
    """(tfd, events, data) of every watch in an epoll fdinfo, in its order
    ('tfd: N events: X data: Y pos: ino: sdev:' lines)."""
    out = []
    for v in info.values("tfd"):
        m = EPOLL_TFD.match(v)
        if m is None:
            raise ValueError(f"unexpected epoll fdinfo line 'tfd: {v}'")
        out.append((int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)))
    return out


def inotify_watches(info: FdInfo) -> list[dict[str, str]]:
    """The key:value fields of every 'inotify wd:N ino:I sdev:D mask:M ...' line."""
    return [dict(p.split(":", 1) for p in v.split() if ":" in p) for v in info.values("inotify")]


def fanotify_marks(info: FdInfo) -> list[dict[str, str]]:
    """The key:value fields of every 'fanotify ino:I sdev:D mflags:F mask:M
    ignored_mask:G ...' (or 'fanotify mnt_id:N ...', 'fanotify sdev:D ...')
    mark line; the 'fanotify flags:F event-flags:E' line is left out."""
    out = []
    for v in info.values("fanotify"):
        fields = dict(p.split(":", 1) for p in v.split() if ":" in p)
        if "flags" not in fields:
            out.append(fields)
    return out


def fanotify_flags(info: FdInfo) -> tuple[int, int]:
    """(fanotify_init flags, event_f_flags) of a fanotify fdinfo (hex)."""
    for v in info.values("fanotify"):
        fields = dict(p.split(":", 1) for p in v.split() if ":" in p)
        if "flags" in fields:
            return int(fields["flags"], 16), int(fields.get("event-flags", "0"), 16)
    raise ValueError("fanotify fdinfo without its flags line")
