"""What each call of the public API returns, and what `lcr CMD --json`
prints: typed, frozen dataclasses, each with ``to_json()`` and a versioned
JSON schema (SCHEMAS, documented in docs/json.md; tests validate the
outputs of the commands against them).

A schema's id is "lcr.<command>/<version>"; every JSON object `lcr` prints
carries it as "schema".  The version goes up when a field changes meaning
or goes away; new fields may appear within a version.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from linuxcr.errors import Reason

VERSION = 1

Json = dict[str, Any]


def schema_id(command: str) -> str:
    return f"lcr.{command}/{VERSION}"


@dataclass(frozen=True)
class CheckpointResult:
    """linuxcr.checkpoint(), `lcr checkpoint --json`."""

    pid: int
    image: str                    # the path written, "fd N" or "-" (stdout)
    image_id: bytes
    pages: int
    bytes_written: int
    seconds: float                # from the first look at the process to the image complete
    frozen_seconds: float
    processes: int = 1
    warnings: tuple[str, ...] = ()
    incremental: Mapping[str, Any] = field(default_factory=dict)  # stored/inherited pages
    digest: int = 0

    def to_json(self) -> Json:
        inc = dict(self.incremental) if self.incremental else None
        return {"schema": schema_id("checkpoint"), "pid": self.pid, "image": self.image,
                "image_id": self.image_id.hex(), "pages": self.pages,
                "bytes": self.bytes_written, "frozen_seconds": self.frozen_seconds,
                "seconds": self.seconds, "processes": self.processes,
                "incremental": None if inc is None else
                {"stored": int(inc.get("stored", 0)), "inherited": int(inc.get("inherited", 0))},
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class RestartResult:
    """linuxcr.restart_full(), `lcr restart --json`."""

    pid: int                      # the root, as the caller sees it
    original_pid: int
    vpid: int                     # the root as it sees itself (in its pid namespace)
    namespace: bool               # restored into a new pid namespace
    processes: int
    pages: int
    seconds: float
    warnings: tuple[str, ...] = ()
    # --lazy: pages left to the page server, its pid, its watchdog's, its log
    lazy_pages: int = 0
    lazy_server: int = 0
    lazy_watchdog: int = 0
    lazy_log: str = ""

    def to_json(self) -> Json:
        out = {"schema": schema_id("restart"), "pid": self.pid,
               "original_pid": self.original_pid, "vpid": self.vpid or self.pid,
               "namespace": self.namespace, "processes": self.processes, "pages": self.pages,
               "seconds": self.seconds, "warnings": list(self.warnings)}
        if self.lazy_server:
            out["lazy"] = {"pages": self.lazy_pages, "server": self.lazy_server,
                           "watchdog": self.lazy_watchdog, "log": self.lazy_log}
        return out


@dataclass(frozen=True)
class RunResult:
    """`lcr run --json`: the pid of the new namespace's init."""

    pid: int
    argv: tuple[str, ...]

    def to_json(self) -> Json:
        return {"schema": schema_id("run"), "pid": self.pid, "argv": list(self.argv)}


@dataclass(frozen=True)
class SnapshotInfo:
    """One in-memory checkpoint: linuxcr.snapshots(), `lcr snapshot(s) --json`."""

    crid: str
    pid: int
    processes: int
    time: float                   # when it was taken (seconds since the epoch)
    frozen_seconds: float
    held: int                     # bytes of memory it holds
    extra: Mapping[str, Any] = field(default_factory=dict)   # what else the agent told (pids, child)

    @classmethod
    def from_agent(cls, d: Mapping[str, Any]) -> SnapshotInfo:
        known = {"crid", "pid", "processes", "time", "frozen_seconds", "held"}
        return cls(crid=str(d["crid"]), pid=int(d["pid"]), processes=int(d.get("processes", 1)),
                   time=float(d.get("time", 0.0)), frozen_seconds=float(d.get("frozen_seconds", 0.0)),
                   held=int(d.get("held", 0)),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_json(self) -> Json:
        return {**self.extra, "schema": schema_id("snapshot"), "crid": self.crid, "pid": self.pid,
                "processes": self.processes, "time": self.time,
                "frozen_seconds": self.frozen_seconds, "held": self.held}


@dataclass(frozen=True)
class WritebackResult:
    """linuxcr.writeback(), `lcr writeback --json`."""

    crid: str
    image: str
    pages: int
    bytes_written: int
    seconds: float

    @classmethod
    def from_agent(cls, crid: str, image: str, d: Mapping[str, Any], seconds: float
                   ) -> WritebackResult:
        return cls(crid=crid, image=image, pages=int(d.get("pages", 0)),
                   bytes_written=int(d.get("bytes", 0)), seconds=seconds)

    def to_json(self) -> Json:
        return {"schema": schema_id("writeback"), "crid": self.crid, "image": self.image,
                "pages": self.pages, "bytes": self.bytes_written, "seconds": self.seconds}


@dataclass(frozen=True)
class RollbackResult:
    """linuxcr.rollback(), `lcr rollback --json`.  ``path``: "fast" (only
    the pages written since the snapshot), "full" or "mixed" (a tree)."""

    crid: str
    pid: int
    path: str
    seconds: float
    pages_copied: int
    pages_dropped: int
    full_because: tuple[str, ...] = ()     # per process: why the full path was needed
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_agent(cls, crid: str, d: Mapping[str, Any]) -> RollbackResult:
        why = tuple(f"pid {r['pid']}: {r['reason']}" for r in d.get("per_process", [])
                    if r.get("reason"))
        return cls(crid=crid, pid=int(d["pid"]), path=str(d.get("path", "full")),
                   seconds=float(d.get("seconds", 0.0)),
                   pages_copied=int(d.get("pages_copied", 0)),
                   pages_dropped=int(d.get("pages_dropped", 0)), full_because=why,
                   warnings=tuple(map(str, d.get("warnings", []))))

    def to_json(self) -> Json:
        return {"schema": schema_id("rollback"), "crid": self.crid, "pid": self.pid,
                "path": self.path, "seconds": self.seconds, "pages_copied": self.pages_copied,
                "pages_dropped": self.pages_dropped, "full_because": list(self.full_because),
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class DiscardResult:
    """`lcr discard --json`."""

    crid: str

    def to_json(self) -> Json:
        return {"schema": schema_id("discard"), "crid": self.crid, "discarded": True}


@dataclass(frozen=True)
class Tracking:
    """How an incremental checkpoint would find the changed pages."""

    method: str                   # "uffd-wp-async" | "content-hash"
    tracked: bool
    why: str

    def to_json(self) -> Json:
        return {"method": self.method, "tracked": self.tracked, "why": self.why}


@dataclass(frozen=True)
class CheckResult:
    """`lcr check --json`: every reason as an object."""

    pid: int
    reasons: tuple[Reason, ...]
    tracking: Tracking | None = None

    @property
    def checkpointable(self) -> bool:
        return not self.reasons

    def to_json(self) -> Json:
        return {"schema": schema_id("check"), "pid": self.pid,
                "checkpointable": self.checkpointable,
                "reasons": [r.to_json() for r in self.reasons],
                "dirty_tracking": self.tracking.to_json() if self.tracking else None}


# --- the JSON schemas (JSON Schema, draft 2020-12) ------------------------------

def _obj(props: dict[str, Any], extra_required: tuple[str, ...] = ()) -> Json:
    return {"type": "object", "required": sorted(set(props) | set(extra_required)),
            "properties": props}


_INT = {"type": "integer", "minimum": 0}
_PID = {"type": "integer", "minimum": 1}
_NUM = {"type": "number", "minimum": 0}
_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}
_NSTR = {"type": ["string", "null"]}


def _schema(command: str, props: dict[str, Any]) -> Json:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": schema_id(command), **_obj({"schema": {"const": schema_id(command)}, **props})}


REASON_SCHEMA = _obj({"pid": _PID, "fd": {"type": ["integer", "null"]},
                      "fds": {"type": "array", "items": _INT}, "address": _NSTR,
                      "kind": {"enum": ["process", "fd", "memory", "lock", "tree"]},
                      "reason": _STR, "remedy": _NSTR, "text": _STR})

SCHEMAS: dict[str, Json] = {
    "checkpoint": _schema("checkpoint", {
        "pid": _PID, "image": _STR, "image_id": {"type": "string", "pattern": "^[0-9a-f]*$"},
        "pages": _INT, "bytes": _INT, "frozen_seconds": _NUM, "seconds": _NUM,
        "processes": _PID, "warnings": _STRS,
        "incremental": {"oneOf": [{"type": "null"}, _obj({"stored": _INT, "inherited": _INT})]}}),
    "restart": _schema("restart", {
        "pid": _PID, "original_pid": _PID, "vpid": _PID, "namespace": {"type": "boolean"},
        "processes": _PID, "pages": _INT, "seconds": _NUM, "warnings": _STRS}),
    "run": _schema("run", {"pid": _PID, "argv": _STRS}),
    "snapshot": _schema("snapshot", {
        "crid": _STR, "pid": _PID, "processes": _PID, "time": _NUM, "frozen_seconds": _NUM,
        "held": _INT}),
    "writeback": _schema("writeback", {
        "crid": _STR, "image": _STR, "pages": _INT, "bytes": _INT, "seconds": _NUM}),
    "rollback": _schema("rollback", {
        "crid": _STR, "pid": _PID, "path": {"enum": ["fast", "full", "mixed"]},
        "seconds": _NUM, "pages_copied": _INT, "pages_dropped": _INT,
        "full_because": _STRS, "warnings": _STRS}),
    "discard": _schema("discard", {"crid": _STR, "discarded": {"const": True}}),
    "check": _schema("check", {
        "pid": _PID, "checkpointable": {"type": "boolean"},
        "reasons": {"type": "array", "items": REASON_SCHEMA},
        "dirty_tracking": {"oneOf": [{"type": "null"}, _obj({
            "method": _STR, "tracked": {"type": "boolean"}, "why": _STR})]}}),
    "show": _schema("show", {"header": {"type": "object"}, "tasks": {"type": "array"}}),
    "diff": _schema("diff", {
        "a": _obj({"image": _STR, "image_id": _STR, "pages": _INT}),
        "b": _obj({"image": _STR, "image_id": _STR, "pages": _INT}),
        "same_process": {"type": "boolean"},
        "processes_added": {"type": "array", "items": _PID},
        "processes_removed": {"type": "array", "items": _PID},
        "tasks": {"type": "array", "items": _obj({
            "pid": _PID, "pages_a": _INT, "pages_b": _INT,
            "areas": _obj({k: {"type": "array", "items": _obj({
                "start": _INT, "end": _INT, "what": _STR, "prot": _INT})}
                for k in ("added", "removed", "changed")}),
            "files": _obj({k: {"type": "array", "items": {"type": "object",
                                                          "required": ["fd"]}}
                           for k in ("opened", "closed", "moved", "replaced")}),
            "threads": _obj({"a": _PID, "b": _PID}),
            "registers_changed": {"type": "boolean"},
            "signals": _obj({"a": {"type": "object"}, "b": {"type": "object"},
                             "changed": {"type": "boolean"}})})}}),
}
# `restart --lazy` only (not required): the pages left to the page server
SCHEMAS["restart"]["properties"]["lazy"] = _obj({"pages": _INT, "server": _PID, "watchdog": _PID,
                                                 "log": _STR})
