"""Parser for /proc/PID/timers: the POSIX timers (timer_create) of a process.

One block of four lines per timer (fs/proc/base.c show_timer)::

    ID: 1
    signal: 35/00000000deadbeef          signo / sigev_value (hex, %px)
    notify: signal/tid.4720              signal|none|thread / pid|tid . number
    ClockID: 0

``notify`` names sigev_notify without SIGEV_THREAD_ID (signal = SIGEV_SIGNAL,
none = SIGEV_NONE, thread = SIGEV_THREAD); ``tid`` instead of ``pid`` means
SIGEV_THREAD_ID was set.  The number is the target as the pid namespace of
the /proc mount shows it (0 when that thread has exited).  The remaining time
and the interval are not in this file: timer_gettime() inside the process.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._text import as_text, lines, proc_path, read_bytes

SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
_NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}


@dataclass(frozen=True)
class ProcTimer:
    id: int
    signo: int
    value: int     # sigev_value (sival_ptr; sival_int in its low 32 bits)
    notify: int    # the raw sigev_notify: SIGEV_SIGNAL|NONE|THREAD, | SIGEV_THREAD_ID
    target: int    # pid (or tid with SIGEV_THREAD_ID) in /proc's pid namespace; 0: gone
    clock: int     # clockid as given to timer_create (negative: a CPU clock of a pid/tid)

    @property
    def thread_id(self) -> bool:
        return bool(self.notify & SIGEV_THREAD_ID)


def _notify(v: str) -> tuple[int, int]:
    how, _, who = v.partition("/")
    kind, _, num = who.partition(".")
    if how not in _NOTIFY or kind not in ("pid", "tid"):
        raise ValueError(f"bad timers notify {v!r}")
    return _NOTIFY[how] | (SIGEV_THREAD_ID if kind == "tid" else 0), int(num)


def parse_timers(text: str | bytes) -> list[ProcTimer]:
    """Every timer of the file, in file order; ValueError on a malformed block."""
    out: list[ProcTimer] = []
    cur: dict[str, str] = {}

    def flush() -> None:
        if not cur:
            return
        try:
            signo, _, value = cur["signal"].partition("/")
            notify, target = _notify(cur["notify"])
            out.append(ProcTimer(id=int(cur["ID"]), signo=int(signo), value=int(value, 16),
                                 notify=notify, target=target, clock=int(cur["ClockID"])))
        except KeyError as e:
            raise ValueError(f"bad timers block: no {e.args[0]!r} line") from None
        cur.clear()

    for ln in lines(as_text(text)):
        key, sep, value = ln.partition(":")
        if not sep:
            raise ValueError(f"bad timers line {ln!r}")
        key, value = key.strip(), value.strip()
        if key == "ID":
            flush()
        elif not cur:
            raise ValueError(f"bad timers file: {key!r} before any ID line")
        cur[key] = value
    flush()
    return out


def read_timers(pid: int | str) -> list[ProcTimer]:
    return parse_timers(read_bytes(proc_path(pid, "timers")))
