"""The per-user snapshot agent (server.py), and its client (client.py).

Snapshots (engine/snapshots.py) outlive the lcr command that took them: a
small daemon per user holds them.  It is the ptrace tracer of every
snapshot child (ptrace belongs to the tracer thread, so the agent serves
requests from one thread, one at a time); PTRACE_O_EXITKILL makes the kernel
kill every snapshot child when the agent dies -- but during a rollback, whose
guardian finishes it if the agent dies (docs/guarantees.md).  Snapshot
children nobody traces (orphans) are killed when an agent starts; while it
works on a process the agent keeps a recovery record (agent/recovery.py).

Where: $LCR_AGENT_DIR, else $XDG_RUNTIME_DIR/lcr, else /tmp/lcr-$UID (mode
0700), holding agent.sock (0600), agent.lock, agent.pid and agent.log.

Protocol: one JSON object per line each way over the UNIX stream socket;
an image's fd travels with its request as SCM_RIGHTS.  Every request is
authenticated with SO_PEERCRED: only root or the owner of the process may
snapshot it or use its crids.

    {"op": "snapshot", "pid": P, "ack": b}       -> {"ok": true, "crid": C, ...}
    {"op": "ack", "crid": C}                     (no reply) the client read the crid: with
                                                 "ack", a snapshot whose connection closes
                                                 before this is discarded
    any request may carry "fault": a LCR_FAULT spec armed for it (tests: LCR_AGENT_FAULT)
    {"op": "list", "pid": P|null}                -> {"ok": true, "snapshots": [...]}
    {"op": "writeback", "crid": C, "compress": b} + fd
    {"op": "rollback", "crid": C, "memory_only": b, "full": b, "note": s}
                                  -> {"ok": true, "path": "fast"|"full"|"mixed",
                                      "pages_copied": N, "pages_dropped": M, "per_process": [...]}
    {"op": "discard", "crid": C}
    {"op": "tracker_put", "pid": P, "starttime": T, "epoch": E, "written": [[s, e], ...]?} + fd
    {"op": "tracker_take", "pid": P, "starttime": T, "with_written": b}
                                  -> {"ok": true, "epoch": E, "written": [[s, e], ...]?} + fd
    {"op": "tracker_drop", "pid": P}               -> {"ok": true, "dropped": b}
    {"op": "ping"} / {"op": "quit"}
errors: {"ok": false, "class": "NoSuchProcess", "error": msg, "hint": h, ...}

Dirty-page trackers (resources/dirty.py): a short-lived `lcr checkpoint
--track` hands the agent its tracker's userfaultfd (SCM_RIGHTS) so that it
outlives the command; a later `lcr checkpoint --parent` takes it back.  One
tracker per pid (a new one replaces the old), usable by the process's owner
or root; the agent closes it when the tracked process dies.  `list` shows
them under "trackers".

The same one tracker per process serves the snapshots (fast rollback:
engine/snapshots.py, "write trackers"): `snapshot` starts one (or resets
the one held); it is closed when neither a snapshot nor a --track
checkpoint wants it any more (discard, tracker_drop), when the process dies,
or with the agent.  Sharing rules: a reset for a snapshot loses the
incremental count since the epoch unless the taker asks ``with_written``
(then the spans reset here come with it); otherwise the epoch is handed
out as "" and the checkpoint compares contents.  Lent to a checkpoint, the
tracker's count is lost for the snapshots unless it comes back with
``written`` (every span that checkpoint collected with a reset): their
next rollback is then a full one.

Rolling back a process that took its own snapshot (linuxcr.transaction):
it was frozen inside the recv() waiting for the snapshot's reply, and that
is where the rollback brings it back.  The agent then sends, on that same
connection, the reply it reads: {"ok": true, "crid": C, "rolled_back": true,
"note": ...}; the snapshot call "returns twice", like setjmp.

This package is two layers: ``client`` (Client, the public calls above and
Snapshot/Transaction: what api.py and applications use; it imports nothing
of the engine) and ``server`` (Agent, run_agent: the daemon, above the engine
it drives).  ``linuxcr.agent`` re-exports the client; ``lcr agent``
(cli.py, started by Client._start as ``python3 -m linuxcr agent``) runs the
server.
"""
from __future__ import annotations

from linuxcr.agent.client import (START_TIMEOUT, Client, Snapshot, Transaction, agent_pid, discard,
                                  drop_tracker, ensure_dir, put_tracker, rollback, runtime_dir,
                                  snapshot, snapshots, take_tracker, trackers, transaction,
                                  writeback)
from linuxcr.errors import AgentError, NoTracker, RolledBack, SnapshotLimit

__all__ = ["START_TIMEOUT", "Client", "Snapshot", "Transaction", "agent_pid", "discard",
           "drop_tracker", "ensure_dir", "put_tracker", "rollback", "runtime_dir", "snapshot",
           "snapshots", "take_tracker", "trackers", "transaction", "writeback", "AgentError",
           "NoTracker", "RolledBack", "SnapshotLimit"]
