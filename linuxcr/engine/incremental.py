"""Incremental checkpoints: images that store only the pages changed since a parent.

``lcr checkpoint PID -o day2.img --parent day1.img`` writes a full set of
metadata (tree, tasks, files, registers...) but only the pages that differ
from what the chain day1.img (and its own parents) holds; a PAGEMAP tells,
page by page, which image of the chain has each page.

What changed is known in one of two ways (resources/dirty.py):
- a write tracker (userfaultfd write-protect, async) running in the process
  since the parent was taken: page exact, costs nothing at checkpoint time.
  Started by ``--track`` (or by ``--interval``); between two `lcr` commands
  the per-user agent holds it, labelled with the id of the image it counts
  from: it is used only if that is the parent's id;
- otherwise the content: every page is hashed (xxh3) and compared with the
  parent's page at the same address (read from the chain).

``--interval`` takes a full image, then incremental ones on a timer, with
retention (``--keep``) and a new full image every ``--full-every``.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from linuxcr.errors import LcrError, NoSuchProcess
from linuxcr.image import runs
from linuxcr.image.chain import Chain
from linuxcr.image.schema import ParentRef
from linuxcr.procfs import read_stat
from linuxcr.remote.task import Arena
from linuxcr.image.stream import PAGE


def _starttime(pid: int) -> int:
    return read_stat(pid).starttime


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

    # -- the agent holds them between commands --------------------------------
    def take_from_agent(self, pids: list[int]) -> None:
        from linuxcr import agent
        from linuxcr.resources import dirty
        for pid in pids:
            try:
                got = agent.take_tracker(pid, _starttime(pid), with_written=True)
            except (LcrError, OSError, AttributeError, TypeError):
                got = None
            if got:
                # the agent may have reset the tracker for snapshots since the
                # epoch: what it collected then comes along, to count as written
                epoch, fd, since = got
                self.by_pid[pid] = dirty.Tracker.adopt(pid, fd)
                self.epoch[pid] = epoch
                self.also_written[pid] = list(since)

    def give_to_agent(self, epoch: str) -> None:
        from linuxcr import agent
        for pid, tr in list(self.by_pid.items()):
            try:
                agent.put_tracker(pid, _starttime(pid), epoch, tr.uffd,  # type: ignore[attr-defined]
                                  written=self.collected.get(pid, []))
            except (LcrError, OSError, AttributeError) as e:
                self.warnings.append(f"pid {pid}: write tracking stops: the agent did not take "
                                     f"its tracker ({e})")
        self.close()

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
        if self.child_path and self.child_path != "-" and not self.child_path.startswith("fd "):
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


def checkpoint(pid: int, fd: int, *, parent: str | None, track: bool, leave_running: bool,
               images_dir: str | None = None, name: str = "image", child_path: str | None = None,
               trackers: Trackers | None = None, keep_trackers: bool = False, **kw):
    """dump.checkpoint with a parent chain and/or write trackers.

    ``trackers``: held by the caller (``--interval``); otherwise taken from
    the agent and, if the process stays running, given back to it."""
    from linuxcr.engine import dump
    if not parent and not track and trackers is None:
        return dump.checkpoint(pid, fd, leave_running=leave_running, name=name, **kw)
    chain = Chain.from_path(parent, images_dir) if parent else None
    own = trackers is None
    if own:
        trackers = Trackers(track=track)
        if leave_running or parent:
            trackers.take_from_agent(_tree_pids(pid))
    base = ParentImage(chain, child_path or name, trackers) if chain else None
    pid_ = None if chain is None else base.parent_id  # type: ignore[union-attr]
    try:
        res = dump.checkpoint(pid, fd, leave_running=leave_running, name=name, base=base,
                              on_frozen=lambda tree: trackers.on_frozen(tree, pid_), **kw)
    except BaseException:
        trackers.close()        # what they counted since the parent is gone with the reset
        raise
    finally:
        if chain is not None:
            chain.close()
    res.warnings += trackers.warnings
    trackers.warnings = []
    epoch = res.image_id.hex()
    if not leave_running:
        trackers.close()
    elif own and not keep_trackers:
        trackers.give_to_agent(epoch)
    else:
        trackers.set_epoch(epoch)
    res.warnings += trackers.warnings
    return res


def _tree_pids(root: int) -> list[int]:
    from linuxcr.resources import pstree
    out, queue = [], [root]
    while queue:
        p = queue.pop(0)
        out.append(p)
        try:
            queue += pstree.children(p)
        except (OSError, LcrError):
            pass
    return out


# --- periodic checkpoints ---------------------------------------------------------

@dataclass
class Saved:
    path: str
    parent: str | None
    seconds: float
    bytes: int
    pages: int
    full: bool


@dataclass
class IntervalRun:
    saved: list[Saved] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reason: str = ""


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


def run_interval(pid: int, outdir: str, interval: float, *, keep: int = 0, full_every: int = 10,
                 compress: bool = False, count: int = 0, on_saved=None,
                 stop: threading.Event | None = None) -> IntervalRun:
    """Checkpoint pid every ``interval`` seconds into outdir, the process
    running on; until it exits, ``count`` images were taken, or SIGINT/SIGTERM."""
    from linuxcr import api
    os.makedirs(outdir, exist_ok=True)
    stop = stop or threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda *_: stop.set())
    run = IntervalRun()
    trackers = Trackers(track=True)
    # a tracker the agent holds for this process (snapshots, --track) must
    # serve here too: a second one could not register over the same memory
    trackers.take_from_agent(_tree_pids(pid))
    from_agent = bool(trackers.by_pid)
    epoch = ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    since_full = 0
    seq = 0
    try:
        while not stop.is_set():
            path = os.path.join(outdir, f"lcr-{pid}-{stamp}-{seq:04d}.img")
            parent = run.saved[-1].path if run.saved and since_full < full_every - 1 else None
            t0 = time.monotonic()
            try:
                res = api.checkpoint(pid, path, leave_running=True, compress=compress,
                                     parent=parent, trackers=trackers)
            except NoSuchProcess as e:
                run.reason = f"the process is gone ({e})"
                break
            except LcrError as e:
                if on_saved:
                    on_saved(None, f"checkpoint {seq} failed: {e}; next one is full")
                since_full = full_every     # start again from a full image
                trackers.close()
                trackers = Trackers(track=True)
                from_agent = False
            else:
                epoch = res.image_id.hex()
                s = Saved(path=path, parent=parent, seconds=time.monotonic() - t0,
                          bytes=res.bytes_written, pages=res.pages, full=parent is None)
                run.saved.append(s)
                since_full = 0 if parent is None else since_full + 1
                _link_latest(outdir, path)
                if keep:
                    need = needed(run.saved, keep)
                    for old_s in [x for x in run.saved if x.path not in need]:
                        try:
                            os.unlink(old_s.path)
                        except FileNotFoundError:
                            pass
                        run.removed.append(old_s.path)
                        run.saved.remove(old_s)
                if on_saved:
                    on_saved(s, "; ".join(res.warnings))
            seq += 1
            if count and seq >= count:
                break
            stop.wait(interval)
        if stop.is_set() and not run.reason:
            run.reason = "stopped"
        elif not run.reason:
            run.reason = f"{count} checkpoints taken"
    finally:
        if from_agent and trackers.by_pid and os.path.exists(f"/proc/{pid}"):
            trackers.give_to_agent(epoch)     # back where it came from, counting from the last image
        trackers.close()
        for s, h in old.items():
            signal.signal(s, h)
    return run


def _link_latest(outdir: str, path: str) -> None:
    """outdir/latest.img -> the newest image (replaced atomically)."""
    tmp = os.path.join(outdir, f".latest-{os.getpid()}")
    try:
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, os.path.join(outdir, "latest.img"))
    except OSError:
        pass
