"""Incremental checkpoints: images that store only the pages changed since a parent.

``lcr checkpoint PID -o day2.img --parent day1.img`` writes a full set of
metadata (tree, tasks, files, registers...) but only the pages that differ
from what the chain day1.img (and its own parents) holds; a PAGEMAP tells,
page by page, which image of the chain has each page.

What changed is known in one of two ways (resources/dirty.py):
- a write tracker (userfaultfd write-protect, async) running in the process
  since the parent was taken: page exact, costs nothing at checkpoint time.
  Started by ``--track`` (or by ``--interval``); between two `lcr` commands
  the per-user agent holds it (api.take_trackers, api.give_trackers), labelled with the id of the image it counts
  from: it is used only if that is the parent's id;
- otherwise the content: every page is hashed (xxh3) and compared with the
  parent's page at the same address (read from the chain).

``--interval`` (linuxcr/periodic.py) takes a full image, then incremental
ones on a timer, with retention (``--keep``) and a new full image every
``--full-every``.

The engine never talks to the agent: the trackers come in as arguments
(api.py takes them from the agent and gives them back).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeGuard

from linuxcr.errors import LcrError
from linuxcr.image import runs
from linuxcr.image import stream
from linuxcr.image.chain import Chain, IndexBuilder, remove_sidecar  # noqa: F401 (periodic.py)
from linuxcr.image.schema import ParentRef
from linuxcr.image.stream import PAGE
from linuxcr.remote.task import Arena


class Trackers:
    """The write trackers of the processes of one tree, across checkpoints.

    ``epoch``: the id of the image the trackers count writes from (hex), or
    "" when they were just started or their count was lost."""

    def __init__(self, track: bool) -> None:
        self.track = track              # start trackers where there are none
        self.by_pid: dict[int, object] = {}
        self.epoch: dict[int, str] = {}
        self.dirty: dict[int, object] = {}   # pid -> Dirty since the parent, taken frozen
        self.also_written: dict[int, list] = {}   # pid -> spans the agent collected since the epoch
        self.collected: dict[int, list] = {}      # pid -> spans we collected (and reset): for the agent
        self.warnings: list[str] = []

    # -- between commands the agent holds them: api.py takes and gives them ------
    def adopt(self, pid: int, tracker, epoch: str, written_since: list) -> None:
        """A tracker that counted writes since image ``epoch`` elsewhere (the
        agent), with the spans that holder collected (and reset) meanwhile:
        they count as written too."""
        self.by_pid[pid] = tracker
        self.epoch[pid] = epoch
        self.also_written[pid] = list(written_since)

    # -- at the checkpoint, everything frozen -----------------------------------
    def on_frozen(self, tree, parent_id: str | None) -> None:
        """Take (and reset) what every tracker counted; start missing ones."""
        from linuxcr.resources import dirty
        self.dirty = {}
        for pid in tree.order:
            tr = self.by_pid.get(pid)
            if tr is not None:
                try:
                    d = tr.collect(reset=True)  # type: ignore[attr-defined]
                except (LcrError, OSError) as e:
                    self.warnings.append(f"pid {pid}: write tracking failed ({e}); "
                                         "pages compared by content")
                    self._drop(pid)
                    continue
                spans = d.spans()  # type: ignore[attr-defined]
                self.collected.setdefault(pid, []).extend(spans)
                if parent_id is not None and self.epoch.get(pid) == parent_id:
                    extra = self.also_written.pop(pid, [])
                    if extra:
                        d = dirty.Dirty(written=d.written, untracked=runs.normalize(  # type: ignore[attr-defined]
                            list(d.untracked) + extra))  # type: ignore[attr-defined]
                    self.dirty[pid] = d
            elif self.track:
                frozen = tree.procs[pid]
                t = frozen.leader
                frozen.block_signals()
                try:
                    with t.scratch() as addr:
                        self.by_pid[pid] = dirty.Tracker.start(t, Arena(t, addr, PAGE))
                except LcrError as e:
                    self.warnings.append(f"pid {pid}: cannot track writes ({e}); the next "
                                         "incremental checkpoint compares pages by content")
                finally:
                    frozen.unblock_signals()
            self.epoch[pid] = ""
        for pid in list(self.by_pid):
            if pid not in tree.order:
                self._drop(pid)

    def written(self, pid: int):
        return self.dirty.get(pid)

    def set_epoch(self, epoch: str) -> None:
        for pid in self.by_pid:
            self.epoch[pid] = epoch

    def _drop(self, pid: int) -> None:
        tr = self.by_pid.pop(pid, None)
        self.epoch.pop(pid, None)
        if tr is not None:
            tr.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for pid in list(self.by_pid):
            self._drop(pid)


def is_path(name: str | None) -> TypeGuard[str]:
    """Is the image's name a file path (not "-", stdin/stdout, nor "fd N")?"""
    return name is not None and name not in ("", "-") and not name.startswith("fd ")


class ParentImage:
    """The ``base`` of dump.checkpoint for an incremental image: a parent chain."""

    def __init__(self, chain: Chain, child_path: str | None, trackers: Trackers | None) -> None:
        self.chain = chain
        self.child_path = child_path
        self.trackers = trackers

    @property
    def parent_id(self) -> str:
        return self.chain.parent.header.image_id.hex()

    def ref(self) -> ParentRef:
        p = self.chain.parent
        path = os.path.abspath(p.path)
        if is_path(self.child_path):
            path = os.path.relpath(path, os.path.dirname(os.path.abspath(self.child_path)))
        depth = p.header.parent.depth + 1 if p.header.parent else 1
        return ParentRef(id=p.header.image_id, digest=p.digest, path=path, depth=depth)

    def held(self, pid: int):
        return self.chain.held(pid)

    def written(self, pid: int):
        return self.trackers.written(pid) if self.trackers else None

    def hashes(self, pid: int):
        return self.chain.hashes(pid) if self.chain.parent.held.get(pid) else None

    def method(self, pid: int) -> str:
        from linuxcr.resources import dirty
        if self.written(pid) is not None:
            return dirty.METHOD_UFFD
        return dirty.METHOD_HASH if self.chain.parent.held.get(pid) else "full"


def checkpoint(pid: int, fd: int, *, parent: str | Chain | None, track: bool = False,
               leave_running: bool, images_dir: str | None = None, name: str = "image",
               child_path: str | None = None, trackers: Trackers | None = None, **kw):
    """dump.checkpoint with a parent chain and/or write trackers.

    ``parent``: the parent image's path, or its chain already open (closed
    here).  ``trackers``: the caller's (api.py takes them from the agent and
    gives them back; the periodic loop keeps them across checkpoints): they
    are left counting from the new image if the process runs on, closed if
    not.  Without them, ``track`` starts trackers that live for this call only."""
    from linuxcr.engine import dump
    if not parent and not track and trackers is None:
        return dump.checkpoint(pid, fd, leave_running=leave_running, name=name, **kw)
    if isinstance(parent, Chain):
        chain: Chain | None = parent
    else:
        chain = Chain.from_path(parent, images_dir) if parent else None
    own = trackers is None
    if trackers is None:
        trackers = Trackers(track=track)
    base = ParentImage(chain, child_path or name, trackers) if chain else None
    pid_ = None if chain is None else base.parent_id  # type: ignore[union-attr]
    side = IndexBuilder()       # IMAGE.lcr-index, so that its child need not read it through
    try:
        with stream.recording(side):
            res = dump.checkpoint(pid, fd, leave_running=leave_running, name=name, base=base,
                                  on_frozen=lambda tree: trackers.on_frozen(tree, pid_), **kw)
    except BaseException:
        trackers.close()        # what they counted since the parent is gone with the reset
        raise
    finally:
        if chain is not None:
            chain.close()
    if is_path(name):
        side.save(name, fd)     # the image is named now (on_written); a failure costs a read later
    res.warnings += trackers.warnings
    trackers.warnings = []
    if not leave_running or own:
        trackers.close()        # nobody holds them past this call
    else:
        trackers.set_epoch(res.image_id.hex())
    return res


# --- periodic checkpoints: pure helpers (the loop is linuxcr/periodic.py) ----------

@dataclass
class Saved:
    path: str
    parent: str | None
    seconds: float
    bytes: int
    pages: int
    full: bool


def parse_duration(text: str) -> float:
    """'10m', '30s', '1h', '500ms', '2.5' (seconds)."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)):
        if t.endswith(suffix) and t[: -len(suffix)].replace(".", "", 1).isdigit():
            v = float(t[: -len(suffix)]) * mult
            break
    else:
        if not t.replace(".", "", 1).isdigit():
            raise ValueError(f"{text!r} is not a duration (like 30s, 10m, 1h)")
        v = float(t)
    if v <= 0:
        raise ValueError(f"{text!r}: the interval must be more than 0")
    return v


def needed(saved: list[Saved], keep: int) -> set[str]:
    """The images the ``keep`` newest ones need (themselves and their chains)."""
    by_path = {s.path: s for s in saved}
    need: set[str] = set()
    for s in saved[-keep:] if keep > 0 else saved:
        cur: Saved | None = s
        while cur is not None and cur.path not in need:
            need.add(cur.path)
            cur = by_path.get(cur.parent) if cur.parent else None
    return need
