"""Fault injection for tests: make lcr fail at a named point.

    LCR_FAULT=<point>[:<action>][@<n>][,<point>...]

``point`` is one of POINTS (``faults.point("name")`` calls placed in the
engine and the image writer); ``action``:

- ``kill`` (default): SIGKILL ourselves: nothing of lcr runs after it, no
  finally, no cleanup: what the kernel does on its own is all that happens;
- ``raise``: raise FaultInjected (an LcrError): every cleanup path runs;
- ``stop``: SIGSTOP ourselves (a test continues us with SIGCONT): holds lcr
  at that point, e.g. to run a second lcr against the same process.

``@n`` fires at the n-th time the point is reached (default 1), e.g.
``dump.pages@3`` for the third page record.  Without LCR_FAULT a point
costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time

from linuxcr.errors import FaultInjected, LcrError

ENV = "LCR_FAULT"

# Every point, where it is, and what has been done to the target(s) there.
POINTS = {
    # checkpoint (engine/dump.py unless said otherwise)
    "dump.seized": "each process of the tree right after it is seized and stopped",
    "dump.frozen": "the whole tree frozen and checked, nothing injected yet",
    "dump.inject": "inside a process, between injected syscalls (scratch page mapped)",
    "dump.collected": "every process collected (injection over), nothing written",
    "dump.pages": "image/stream.py: before each PAGES record is written (@2: one is out)",
    "dump.trailer": "image/stream.py: everything written but the trailer",
    "dump.rename": "api.py: image complete, not yet renamed to its name",
    "dump.kill": "image complete and visible, tree still frozen, not yet killed/thawed",
    # inside each kill-safe injected call into a live task (remote/task.py);
    # @n picks the n-th call of the run
    "inject.masked": "a guarded call: every signal blocked, not yet at its SIGSTOP stop",
    "inject.parked": "a guarded call: registers set to the parking pause(), not yet entered",
    "inject.entry": "a guarded call: at pause's entry stop, SIGSTOP re-queued, real call not set",
    "inject.exit": "a guarded call: at the real call's exit stop, injected registers in place",
    "inject.rest": "a guarded call done: own registers and mask back, SIGSTOP pending",
    "inject.mapped": "the guarded scratch mapping exists, its code page not yet written",
    "clone.entry": "a guarded clone3 (snapshot fork) set up at its entry stop, no child yet",
    "clone.event": "a guarded clone3: the child exists (fork event), not yet owned",
    "clone.exit": "a guarded clone3: at its exit stop, injected registers in the parent",
    "clone.rest": "a guarded clone3 done, the child not yet carrying EXITKILL",
    "lazy.uffd": "resources/lazy.py: a restored task's userfaultfd exists in it (restart --lazy)",
    "lazy.indexed": "resources/lazy.py: lazy areas registered, pages indexed, no page server yet",
    "lazy.serve": "resources/lazy.py: the page server, at each turn of its loop",
    "track.uffd": "resources/dirty.py: the tracker's userfaultfd exists in the target",
    # the snapshot agent (LCR_AGENT_FAULT of a client arms LCR_FAULT in the
    # agent for that client's requests: agent/server.py)
    "snapshot.taken": "agent: a snapshot taken and held, its reply not yet sent",
    "snapshot.reply": "client (agent/client.py): the crid read, not yet acknowledged",
    "rollback.frozen": "agent: the processes frozen, no guardian yet, nothing changed",
    "rollback.begun": "agent: guarded, snapshot children loosened, rollback marked begun",
    "rollback.dropped": "resources/memory.py fast path: pages dropped, none copied back yet",
    "rollback.unmapped": "resources/memory.py full path: areas rebuilt, no page copied yet",
    "rollback.finished": "agent: memory and the rest rolled back, threads not settled",
    "rollback.done": "agent: marked done in the journal, threads not let go",
    # restart (engine/restore.py)
    "restore.spawned": "the blank task exists, not yet seized",
    "restore.tree": "right after each task of the tree is made (seized)",
    "restore.pages": "right after each PAGES record was poured into a task",
    "restore.cow_fork": "a tree sharing pages: a parent filled, its next child not yet forked",
    "restore.finished": "every task rebuilt, registers set, none detached yet",
    "restore.release": "every task finished, ^C/SIGTERM/SIGHUP held, none detached yet",
}

_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        name, _, action = name.partition(":")
        action = action or "kill"
        if name not in POINTS:
            raise LcrError(f"{ENV}: unknown fault point {name!r}",
                           "one of: " + ", ".join(POINTS))
        if action not in ("kill", "raise", "stop"):
            raise LcrError(f"{ENV}: unknown action {action!r} for {name} (kill, raise or stop)")
        try:
            n = int(nth) if nth else 1
        except ValueError:
            raise LcrError(f"{ENV}: bad count {nth!r} for {name}") from None
        out[name] = (action, n)
    return out


def point(name: str) -> None:
    """A place where LCR_FAULT can make lcr fail."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    assert name in POINTS, name
    want = _parse(spec).get(name)
    if want is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    action, n = want
    if _hits[name] != n:
        return
    if action == "raise":
        raise FaultInjected(f"fault injected at {name} ({POINTS[name]})")
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    os.kill(os.getpid(), sig)
    if action == "kill":     # SIGKILL is not instant for the sender; never go on
        while True:
            time.sleep(1)


def reset() -> None:
    """Forget the hit counts (tests that call lcr in-process)."""
    _hits.clear()


__all__ = ["point", "POINTS", "FaultInjected", "reset"]
