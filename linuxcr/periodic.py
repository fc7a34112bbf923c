"""Periodic checkpoints: ``lcr checkpoint PID --interval 10m -o DIR``.

A full image, then incremental ones on a timer (each through api.checkpoint,
the process running on), with retention (``--keep``) and a new full image
every ``--full-every``.  One set of write trackers serves the whole run: taken
from the agent at the start (api.take_trackers), handed from checkpoint to
checkpoint, given back at the end (api.give_trackers).  Above the API: it
only calls it (and the pure helpers of engine/incremental.py).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from linuxcr import api
from linuxcr.engine.incremental import Saved, Trackers, needed, remove_sidecar
from linuxcr.errors import LcrError, NoSuchProcess


@dataclass
class IntervalRun:
    saved: list[Saved] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reason: str = ""


def run_interval(pid: int, outdir: str, interval: float, *, keep: int = 0, full_every: int = 10,
                 compress: bool = False, count: int = 0, on_saved=None,
                 stop: threading.Event | None = None) -> IntervalRun:
    """Checkpoint pid every ``interval`` seconds into outdir, the process
    running on; until it exits, ``count`` images were taken, or SIGINT/SIGTERM."""
    os.makedirs(outdir, exist_ok=True)
    stop = stop or threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda *_: stop.set())
    run = IntervalRun()
    # a tracker the agent holds for this process (snapshots, --track) must
    # serve here too: a second one could not register over the same memory
    trackers = api.take_trackers(pid, track=True)
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
                        remove_sidecar(old_s.path)
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
            api.give_trackers(trackers, epoch)   # back where it came from, counting from the last image
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
