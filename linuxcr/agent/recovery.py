"""Recovery records: what the agent was doing to a process, on disk.

While the agent snapshots or rolls back a process it keeps
``<runtime dir>/recovery/PID.json`` saying so (op, crid, the agent's and the
guardian's pid and start time, and the state: "started", "held" (the
guardian knows the process), "begun" (the rollback changes it), "completing
by guardian G").  It is removed when the operation ends, by the agent or --
if the agent died -- by the guardian that put the process back or finished
the rollback (engine/snapshots.py, remote/guardian.py).

A record left behind therefore means that both the agent and its guardian
died while the process was held: ``notes(pid)`` (shown by ``lcr check``)
says in what state, ``sweep`` (at the agent's start) drops the records
whose process runs freely again or is gone.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

SUBDIR = "recovery"


def _start(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    """pid is that process (same start time), not a zombie."""
    if not pid or not start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X") and int(fields[19]) == start
    except (OSError, IndexError, ValueError):
        return False


class Record:
    """The record of one operation on ``pid`` (written at once)."""

    def __init__(self, d: Path, op: str, pid: int, crid: str = "") -> None:
        self.path = Path(d) / SUBDIR / f"{pid}.json"
        me = os.getpid()
        self.data = dict(op=op, pid=pid, crid=crid, starttime=_start(pid), agent=me,
                         agent_start=_start(me), guardian=0, guardian_start=0,
                         state="started", time=time.time())
        self._write()

    def state(self, state: str, guardian: int = 0) -> None:
        """A new state ("done": the record goes).  Called by the guardian
        too ("completing by guardian G"): it is then the guardian."""
        if state == "done":
            self.clear()
            return
        if state.startswith("completing"):
            guardian = os.getpid()
        if guardian:
            self.data.update(guardian=guardian, guardian_start=_start(guardian))
        self.data["state"] = state
        self._write()

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError:
            pass          # a record is a help for the double failure, never a reason to fail


def _held(pid: int) -> bool:
    """Some thread stopped, or every signal blocked (parked in pause())."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = dict(ln.split(":", 1) for ln in f if ":" in ln)
            if st.get("State", "").split()[0:1] in (["T"], ["t"]):
                return True
            if int(st.get("SigBlk", "0").strip(), 16) | (1 << 8) | (1 << 18) == (1 << 64) - 1:
                return True
    except (OSError, ValueError):
        return False
    return False


def _describe(r: dict) -> str:
    who = f"the lcr agent (pid {r['agent']})"
    if r.get("guardian"):
        who += f" and its guardian (pid {r['guardian']})"
    if r["op"] == "rollback":
        crid = r.get("crid", "?")
        if r["state"] == "begun" or r["state"].startswith("completing"):
            return (f"{who} died while rolling it back to snapshot {crid}: it is held stopped, "
                    "half rolled back, and cannot go on (its snapshot died with the agent); "
                    "kill it")
        return (f"{who} died while it was held for a rollback to snapshot {crid}, before "
                "anything was changed: it is held stopped, possibly with lcr's registers in "
                "place; nobody puts it back (no lcr recover yet); kill it")
    return (f"{who} died while taking a snapshot of it: it is held stopped, possibly with "
            "lcr's registers or a scratch mapping in place; nobody puts it back "
            "(no lcr recover yet); kill it")


def _records(d: Path) -> list[tuple[Path, dict]]:
    out = []
    try:
        names = os.listdir(Path(d) / SUBDIR)
    except OSError:
        return []
    for name in names:
        if name.endswith(".json"):
            p = Path(d) / SUBDIR / name
            try:
                out.append((p, json.loads(p.read_text())))
            except (OSError, ValueError):
                continue
    return out


def _abandoned(r: dict) -> bool | None:
    """True: both died, the process is still held; False: stale (process
    gone or free); None: someone still works on it."""
    if _start(r["pid"]) != r["starttime"]:
        return False
    if _alive(r["agent"], r["agent_start"]) or _alive(r.get("guardian", 0), r.get("guardian_start", 0)):
        return None
    return _held(r["pid"])


def notes(d: Path, pid: int) -> list[str]:
    """What ``lcr check PID`` must say about a record left for pid."""
    out = []
    for _p, r in _records(d):
        if r.get("pid") == pid and _abandoned(r):
            out.append(_describe(r) + f" (record {_p})")
    return out


def sweep(d: Path) -> list[str]:
    """Drop stale records; one line for each abandoned one."""
    lines = []
    for p, r in _records(d):
        state = _abandoned(r)
        if state is False:
            try:
                p.unlink()
            except OSError:
                pass
        elif state:
            lines.append(f"pid {r['pid']}: {_describe(r)} (record {p})")
    return lines
