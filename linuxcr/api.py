"""Public Python API (what the CLI calls).

    linuxcr.checkpoint(pid, "app.img")            # or an open fd / file object
    pid = linuxcr.restart("app.img")
    reasons = linuxcr.check(pid)                  # [] when checkpointable
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Union

from linuxcr import faults
from linuxcr.errors import ImageError, ImageWriteError, LcrError, NoSuchProcess, PermissionDenied
from linuxcr.image import files

# The engine, image and resource modules are imported in the functions that
# use them: `lcr restart` need not import the dump engine, `lcr check` not the
# image writer, `lcr --version` none of them (start-up time, tests/test_startup.py).
if TYPE_CHECKING:
    from linuxcr.engine import dump, incremental, restore
    from linuxcr.image import sign as _sign

KeyArg = Union[str, os.PathLike, "_sign.Key", None]

Target = files.Target


def as_pid(pid: object) -> int:
    """``pid`` as a process id (> 0), or NoSuchProcess."""
    try:
        p = int(pid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NoSuchProcess(f"{pid!r} is not a process id") from None
    if p <= 0:
        raise NoSuchProcess(f"{p} is not a process id")
    return p


def load_key(key: KeyArg, *, signing: bool) -> _sign.Key | None:
    """The key of --sign/--verify (None: none); KeyFileError if unusable."""
    if key is None:
        return None
    from linuxcr.image import sign as _sign
    return _sign.load_key(key, signing=signing)


def checkpoint(pid: int, out: Target, *, leave_running: bool = False, compress: bool = False,
               progress=None, sign: KeyArg = None, parent: str | os.PathLike | None = None,
               track: bool = False, images_dir: str | None = None,
               trackers=None) -> dump.DumpResult:
    """Save process ``pid`` to ``out`` (path, fd or binary file object).

    The process is killed after a complete image was written, unless
    ``leave_running``; on any error it is left running as it was.
    ``sign``: a key file (HMAC secret or Ed25519 private key, see
    image/sign.py) to sign the image with.
    ``parent``: an earlier image of this process: write only the pages that
    changed since (an incremental image; engine/incremental.py).
    ``track``: keep counting the pages the process writes (userfaultfd), so
    that the next incremental checkpoint need not compare contents."""
    from linuxcr.engine import incremental
    from linuxcr.image import stream
    from linuxcr.image.chain import Chain
    pid = as_pid(pid)
    signer = load_key(sign, signing=True)       # a bad key fails before the process is touched
    parent = os.fspath(parent) if parent is not None else None
    if parent is not None and not isinstance(out, int) and not hasattr(out, "fileno") \
            and os.path.exists(os.fspath(out)) and os.path.exists(parent) \
            and os.path.samefile(os.fspath(out), parent):
        raise ImageWriteError(f"{parent} cannot be both the parent and the new image")
    # the agent lends its trackers for this checkpoint only when the caller
    # holds none (--interval holds its own across checkpoints)
    lent = trackers is None and (track or bool(parent)) and (leave_running or bool(parent))
    with files.output_image(out) as (fd, name, commit), stream.options(signer=signer):
        chain = Chain.from_path(parent, images_dir) if parent else None    # before taking trackers
        if lent:
            try:
                trackers = take_trackers(pid, track=track)
            except BaseException:
                if chain is not None:
                    chain.close()
                raise
        res = incremental.checkpoint(pid, fd, parent=chain, track=track,
                                     leave_running=leave_running, name=name, compress=compress,
                                     on_written=commit, progress=progress, trackers=trackers)
    if lent and leave_running:
        give_trackers(trackers, res.image_id.hex())   # counting from this image on
        res.warnings += trackers.warnings
    return res


def take_trackers(pid: int, *, track: bool) -> incremental.Trackers:
    """Write trackers for the tree of ``pid``: those the agent holds (lent to
    us, with what it collected since their epoch), new ones started at the
    checkpoint where there are none if ``track``."""
    from linuxcr import agent
    from linuxcr.engine import incremental
    from linuxcr.procfs import read_stat
    from linuxcr.resources import dirty, pstree
    trackers = incremental.Trackers(track=track)
    for p in pstree.tree_pids(pid):
        try:
            got = agent.take_tracker(p, read_stat(p).starttime, with_written=True)
        except (LcrError, OSError, AttributeError, TypeError):
            got = None
        if got:
            # the agent may have reset the tracker for snapshots since the
            # epoch: what it collected then comes along, to count as written
            epoch, fd, since = got
            trackers.adopt(p, dirty.Tracker.adopt(p, fd), epoch, since)
    return trackers


def give_trackers(trackers: incremental.Trackers, epoch: str) -> None:
    """Hand ``trackers`` to the agent (counting since image ``epoch``), with
    every span we collected (and reset) while we held them; then close ours.
    A tracker the agent does not take stops, with a warning."""
    from linuxcr import agent
    from linuxcr.procfs import read_stat
    for pid, tr in list(trackers.by_pid.items()):
        try:
            agent.put_tracker(pid, read_stat(pid).starttime, epoch, tr.uffd,  # type: ignore[attr-defined]
                              written=trackers.collected.get(pid, []))
        except (LcrError, OSError, AttributeError) as e:
            trackers.warnings.append(f"pid {pid}: write tracking stops: the agent did not take "
                                     f"its tracker ({e})")
    trackers.close()


def restart(image: Target, *, any_pid: bool = False, verify: KeyArg = None,
            trust: Iterable[str] | str = (), images_dir: str | None = None) -> int:
    """Restart the process saved in ``image``; returns its pid.

    The restored process is a child of the caller until the caller exits.
    ``verify``: a key file; the image must carry a good signature by it.
    ``trust`` (root): what the image may be granted: "uid", "caps",
    "setuid", "files" or "all" (see resources/process.py)."""
    return restart_full(image, any_pid=any_pid, verify=verify, trust=trust,
                        images_dir=images_dir).pid


def restart_full(image: Target, *, any_pid: bool = False, verify: KeyArg = None,
                 trust: Iterable[str] | str = (), images_dir: str | None = None
                 ) -> restore.RestoreResult:
    """As restart(); an incremental image finds its parents beside it (the
    paths it recorded), or in ``images_dir``."""
    from linuxcr.engine import restore
    from linuxcr.image import stream
    from linuxcr.resources import process
    verifier = load_key(verify, signing=False)
    trusted = process.parse_trust(trust)
    # Who could have written the image and each parent is noted as each is
    # opened (image/source.py); a good signature stands for root's own.
    policy = process.RestorePolicy(trust=trusted, any_pid=any_pid, verified=verifier is not None)
    with files.watch_sources(policy.add_source), files.input_image(image) as (fd, name):
        policy.image_name = name
        with stream.options(verifier=verifier, observer=policy.observe), \
                process.restore_policy(policy):
            return restore.restart(fd, any_pid=any_pid, name=name, images_dir=images_dir)


def show(image: Target, *, verify: KeyArg = None) -> dict:
    """What ``image`` holds (``lcr show``); reads and checks all of it, and
    its signatures with ``verify``."""
    from linuxcr.image import sign as _sign
    from linuxcr.image import stream
    from linuxcr.image.show import summarize
    verifier = load_key(verify, signing=False)
    with files.input_image(image) as (fd, name), stream.options(verifier=verifier):
        s = summarize(fd, name)
    if verifier is not None:
        s["signature"] = {"verified": True, "alg": verifier.alg,
                          "key_id": _sign.key_id_hex(verifier.key_id)}
    return s


def check(pid: int, tree: bool = True) -> list[str]:
    """Reasons why ``pid`` (and, with tree, its descendants) cannot be
    checkpointed now ([] if it can)."""
    from linuxcr.engine import dump
    pid = as_pid(pid)
    return dump.check_tree(pid) if tree else \
        [r for r in dump.check_process(pid) if not dump.checkpoint_saves(r)]


def migrate(pid: int, host: str, port: int, **kw):
    """Live-migrate pid (and its descendants) to ``lcr receive`` at host:port
    (engine/migrate.py); returns a MigrateResult."""
    from linuxcr.engine import migrate as _m
    return _m.migrate(pid, host, port, **kw)


def receive(*args, **kw):
    """Accept one migration and restart it here (engine/migrate.py)."""
    from linuxcr.engine import migrate as _m
    return _m.receive(*args, **kw)


def tracking(pid: int) -> dict:
    """How an incremental checkpoint of pid would find the pages changed since
    its parent: {"method": "uffd-wp-async" | "content-hash", "tracked": bool,
    "why": one line}."""
    from linuxcr.resources import dirty
    pid = as_pid(pid)
    ok, why = dirty.available(pid)
    held = None
    try:
        from linuxcr import agent
        with agent.Client(start=False) as c:       # no agent: no tracker
            held = next((t.get("epoch") or "(none yet)" for t in c.call("list").get("trackers", [])
                         if t.get("pid") == pid), None)
    except (LcrError, OSError):
        held = None
    if held:
        return {"method": dirty.METHOD_UFFD, "tracked": True,
                "why": f"the agent holds its write tracker (counting since image {held[:12]}); "
                       "a --parent checkpoint of that image uses it"}
    if ok:
        return {"method": dirty.METHOD_HASH, "tracked": False,
                "why": f"no write tracker yet; --track starts one ({dirty.METHOD_UFFD} works here), "
                       "and later --parent checkpoints use it"}
    return {"method": dirty.METHOD_HASH, "tracked": False,
            "why": f"write tracking is not available ({why}): every page is hashed and compared"}


def run(argv: list[str], *, log: str | None = None, cwd: str | None = None,
        namespaces: tuple[str, ...] = (), hostname: str | None = None) -> int:
    """Start argv as pid 1 of a fresh pid namespace, detached, ready to be
    checkpointed as a whole tree; returns its pid.  ``namespaces``: more
    namespaces of its own (ipc, uts, net, mnt), made again on restart;
    ``hostname``: its hostname in a uts namespace of its own."""
    from linuxcr.engine import spawn
    from linuxcr.resources import namespaces as ns
    if not argv:
        raise LcrError("nothing to run")
    kinds = set(namespaces) | ({"uts"} if hostname is not None else set())
    return spawn.run_in_namespace(list(argv), log, cwd, sum(ns.FLAGS[k] for k in kinds), hostname)


__all__ = ["checkpoint", "restart", "restart_full", "check", "run", "LcrError"]


# --- in-memory checkpoints (crid snapshots, held by the per-user agent) -----

def snapshot(pid: int):
    """Snapshot process ``pid`` in memory (copy-on-write); returns a handle
    with .crid, .writeback(out), .rollback(), .discard()."""
    from linuxcr import agent
    return agent.snapshot(as_pid(pid))


def snapshots(pid: int | None = None) -> list[dict]:
    """The snapshots you may use (of ``pid`` only, if given)."""
    from linuxcr import agent
    return agent.snapshots(None if pid is None else as_pid(pid))


def writeback(crid: str, out: Target, *, compress: bool = False) -> dict:
    from linuxcr import agent
    return agent.writeback(crid, out, compress=compress)


def rollback(crid: str, *, memory_only: bool = False, full: bool = False) -> dict:
    """Bring the process (or tree) of ``crid`` back; the reply says how:
    ``path`` fast (only the pages written since, known from the write
    tracker) or full, ``pages_copied``, ``pages_dropped``."""
    from linuxcr import agent
    return agent.rollback(crid, memory_only=memory_only, full=full)


def discard(crid: str) -> None:
    from linuxcr import agent
    agent.discard(crid)


def transaction(*, memory_only: bool = False, rollback_on_error: bool = True):
    """``with linuxcr.transaction() as t: ...; t.rollback()`` for the calling
    process itself; after a rollback the ``with`` raises agent.RolledBack."""
    from linuxcr import agent
    return agent.transaction(memory_only=memory_only, rollback_on_error=rollback_on_error)


def may_read_memory(pid: int) -> None:
    """The kernel's own answer to "may I read pid's memory" (the ptrace
    access check of /proc/PID/mem): a process of another user is "permission
    denied", not "no such process" (the snapshot reads /proc files that say
    only ENOENT/EACCES)."""
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        raise NoSuchProcess(f"pid {pid}: no such process") from None
    except PermissionError:
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            raise NoSuchProcess(f"pid {pid}: no such process") from None
        if owner != os.geteuid() and os.geteuid() != 0:
            raise PermissionDenied(f"pid {pid}: permission denied: it belongs to uid {owner}",
                                   "run lcr as that user or as root") from None
        raise PermissionDenied(f"pid {pid}: permission denied: the kernel refused access to its "
                               "memory", "it may be set-uid, non-dumpable, or protected by "
                               "a security module") from None


def checkpoint_low_downtime(pid: int, out: Target, *, leave_running: bool = False,
                            compress: bool = False, progress=None) -> dump.DumpResult:
    """checkpoint() frozen only for a copy-on-write snapshot: the image is
    written from the snapshot while the process runs on (lcr itself holds
    the snapshot; no agent).  Then the process is killed unless leave_running."""
    import time
    from linuxcr.engine import dump
    from linuxcr.engine import snapshots as snaps
    pid = as_pid(pid)
    may_read_memory(pid)
    if not isinstance(out, int) and not hasattr(out, "fileno"):
        files.check_output(os.fspath(out))    # refused before the process is touched
    t0 = time.monotonic()
    snap = snaps.take(pid)
    try:
        with files.output_image(out) as (fd, name, commit):
            res = snaps.writeback(snap, fd, compress=compress, name=name, progress=progress)
            commit()
    finally:
        snaps.discard(snap)
    if not leave_running:
        import signal as _signal
        try:
            if dump.read_stat(pid).starttime == snap.starttime:
                os.kill(pid, _signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return dump.DumpResult(pid=pid, pages=res["pages"], bytes_written=res["bytes"],
                           seconds=time.monotonic() - t0, frozen_seconds=snap.frozen_seconds)
