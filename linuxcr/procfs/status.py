"""Parser for /proc/PID/status ('Key:\\tvalue' lines).

Only the keys checkpoint/restore cares about become typed fields; everything is
also kept raw in `raw`. Missing keys (old kernels, kernel threads) get defaults.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ._text import as_text, lines, proc_path, read_bytes

T = TypeVar("T")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f", "a": "\a", "e": "\x1b", "\\": "\\", '"': '"'}
_ESCAPE_RE = re.compile(r"\\([0-7]{3}|.)", re.DOTALL)


@dataclass(frozen=True)
class ProcStatus:
    name: str
    umask: int | None = None
    state: str = ""  # the letter only: 'R', 'S', 't', ...
    tgid: int = 0
    pid: int = 0
    ppid: int = 0
    tracer_pid: int = 0
    uid: tuple[int, ...] = (0, 0, 0, 0)  # real, effective, saved, fs
    gid: tuple[int, ...] = (0, 0, 0, 0)
    groups: tuple[int, ...] = ()
    ns_tgid: tuple[int, ...] = ()  # outermost namespace first
    ns_pid: tuple[int, ...] = ()
    ns_pgid: tuple[int, ...] = ()
    ns_sid: tuple[int, ...] = ()
    threads: int = 0
    sig_q: tuple[int, int] = (0, 0)  # queued, limit
    sig_pnd: int = 0
    shd_pnd: int = 0
    sig_blk: int = 0
    sig_ign: int = 0
    sig_cgt: int = 0
    cap_inh: int = 0
    cap_prm: int = 0
    cap_eff: int = 0
    cap_bnd: int = 0
    cap_amb: int = 0
    no_new_privs: int = 0
    seccomp: int = 0
    seccomp_filters: int = 0     # how many filters (Seccomp_filters:, Linux 5.9+)
    raw: dict[str, str] = field(default_factory=dict, hash=False, repr=False)

    @property
    def pidns_init(self) -> bool:
        """pid 1 of a pid namespace of its own (NSpid: more than one level,
        the innermost 1), as the root of an `lcr run` tree is."""
        return len(self.ns_pid) > 1 and self.ns_pid[-1] == 1


def _unescape(value: str) -> str:
    """Undo the kernel's string escaping of Name (\\n, \\t, \\\\, octal)."""

    def sub(m: re.Match[str]) -> str:
        s = m.group(1)
        return chr(int(s, 8)) if len(s) == 3 else _ESCAPES.get(s, m.group(0))

    return _ESCAPE_RE.sub(sub, value)


def _ints(value: str, base: int = 10) -> tuple[int, ...]:
    return tuple(int(v, base) for v in value.replace("/", " ").split())


def _get(raw: dict[str, str], key: str, conv: Callable[[str], T], default: T) -> T:
    """Convert raw[key], falling back to default if absent or malformed."""
    try:
        return conv(raw[key]) if key in raw else default
    except (ValueError, IndexError):
        return default


def _four(value: str) -> tuple[int, ...]:
    ids = _ints(value)
    if len(ids) != 4:
        raise ValueError(value)
    return ids


def _pair(value: str) -> tuple[int, int]:
    queued, limit = _ints(value)
    return queued, limit


def parse_status(text: str | bytes) -> ProcStatus:
    """Parse /proc/PID/status; never fails on missing or malformed optional keys."""
    raw: dict[str, str] = {}
    for ln in lines(as_text(text)):
        key, sep, value = ln.partition(":")
        if sep:
            raw[key] = value.removeprefix("\t") if key == "Name" else value.strip()
    hexint: Callable[[str], int] = lambda v: int(v, 16)  # noqa: E731
    return ProcStatus(
        name=_unescape(raw.get("Name", "")),
        umask=_get(raw, "Umask", lambda v: int(v, 8), None),
        state=raw.get("State", "")[:1],
        tgid=_get(raw, "Tgid", int, 0),
        pid=_get(raw, "Pid", int, 0),
        ppid=_get(raw, "PPid", int, 0),
        tracer_pid=_get(raw, "TracerPid", int, 0),
        uid=_get(raw, "Uid", _four, (0, 0, 0, 0)),
        gid=_get(raw, "Gid", _four, (0, 0, 0, 0)),
        groups=_get(raw, "Groups", _ints, ()),
        ns_tgid=_get(raw, "NStgid", _ints, ()),
        ns_pid=_get(raw, "NSpid", _ints, ()),
        ns_pgid=_get(raw, "NSpgid", _ints, ()),
        ns_sid=_get(raw, "NSsid", _ints, ()),
        threads=_get(raw, "Threads", int, 0),
        sig_q=_get(raw, "SigQ", _pair, (0, 0)),
        sig_pnd=_get(raw, "SigPnd", hexint, 0),
        shd_pnd=_get(raw, "ShdPnd", hexint, 0),
        sig_blk=_get(raw, "SigBlk", hexint, 0),
        sig_ign=_get(raw, "SigIgn", hexint, 0),
        sig_cgt=_get(raw, "SigCgt", hexint, 0),
        cap_inh=_get(raw, "CapInh", hexint, 0),
        cap_prm=_get(raw, "CapPrm", hexint, 0),
        cap_eff=_get(raw, "CapEff", hexint, 0),
        cap_bnd=_get(raw, "CapBnd", hexint, 0),
        cap_amb=_get(raw, "CapAmb", hexint, 0),
        no_new_privs=_get(raw, "NoNewPrivs", int, 0),
        seccomp=_get(raw, "Seccomp", int, 0),
        seccomp_filters=_get(raw, "Seccomp_filters", int, 0),
        raw=raw,
    )


def read_status(pid: int | str) -> ProcStatus:
    return parse_status(read_bytes(proc_path(pid, "status")))
