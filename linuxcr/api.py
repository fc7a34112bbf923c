"""Public Python API (what the CLI calls).

    linuxcr.checkpoint(pid, "app.img")            # or an open fd / file object
    pid = linuxcr.restart("app.img")
    reasons = linuxcr.check(pid)                  # [] when checkpointable
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Union

from linuxcr import faults
from linuxcr.errors import ImageError, ImageWriteError, LcrError, NoSuchProcess
from linuxcr.image import files

# The engine, image and resource modules are imported in the functions that
# use them: `lcr restart` need not import the dump engine, `lcr check` not the
# image writer, `lcr --version` none of them (start-up time, tests/test_startup.py).
if TYPE_CHECKING:
    from linuxcr.engine import dump, restore
    from linuxcr.image import sign as _sign

KeyArg = Union[str, os.PathLike, "_sign.Key", None]

Target = files.Target


def _pid(pid: object) -> int:
    try:
        p = int(pid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NoSuchProcess(f"{pid!r} is not a process id") from None
    if p <= 0:
        raise NoSuchProcess(f"{p} is not a process id")
    return p


def _key(key: KeyArg, *, signing: bool) -> _sign.Key | None:
    if key is None:
        return None
    from linuxcr.image import sign as _sign
    return _sign.load_key(key, signing=signing)


def checkpoint(pid: int, out: Target, *, leave_running: bool = False, compress: bool = False,
               progress=None, sign: KeyArg = None, parent: str | os.PathLike | None = None,
               track: bool = False, images_dir: str | None = None,
               trackers=None, external: bool = False, shell_job: bool = False) -> dump.DumpResult:
    """Save process ``pid`` to ``out`` (path, fd or binary file object).

    The process is killed after a complete image was written, unless
    ``leave_running``; on any error it is left running as it was.
    ``sign``: a key file (HMAC secret or Ed25519 private key, see
    image/sign.py) to sign the image with.
    ``parent``: an earlier image of this process: write only the pages that
    changed since (an incremental image; engine/incremental.py).
    ``track``: keep counting the pages the process writes (userfaultfd), so
    that the next incremental checkpoint need not compare contents.
    ``external``: record pipes and sockets leading out of the tree (restart
    then needs ``fds``, resources/external.py) instead of refusing.
    ``shell_job``: the terminal the process runs on (its master outside the
    tree) is saved as external (restart with ``shell_job``)."""
    from linuxcr.engine import incremental
    from linuxcr.image import stream
    from linuxcr.resources import external as _ext
    pid = _pid(pid)
    signer = _key(sign, signing=True)       # a bad key fails before the process is touched
    parent = os.fspath(parent) if parent is not None else None
    if parent is not None and not isinstance(out, int) and not hasattr(out, "fileno") \
            and os.path.exists(os.fspath(out)) and os.path.exists(parent) \
            and os.path.samefile(os.fspath(out), parent):
        raise ImageWriteError(f"{parent} cannot be both the parent and the new image")
    with files.output_image(out) as (fd, name, commit), stream.options(signer=signer), \
            _ext.options(record=external), _ext.pty.options(shell_job=shell_job):
        return incremental.checkpoint(pid, fd, parent=parent, track=track,
                                      leave_running=leave_running, images_dir=images_dir,
                                      name=name, compress=compress, on_written=commit,
                                      progress=progress, trackers=trackers)


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
                 trust: Iterable[str] | str = (), images_dir: str | None = None,
                 fds: dict[int, str] | Iterable[str] | None = None,
                 shell_job: bool = False) -> restore.RestoreResult:
    """As restart(); an incremental image finds its parents beside it (the
    paths it recorded), or in ``images_dir``.  ``fds``: {N: "PATH" | "-" |
    "&M"}, the new file of each external fd N (resources/external.py), or
    the CLI's ["N=PATH", ...]."""
    from linuxcr.engine import restore
    from linuxcr.image import stream
    from linuxcr.resources import external as _ext
    from linuxcr.resources import process
    verifier = _key(verify, signing=False)
    trusted = process.parse_trust(trust)
    if fds is not None and not isinstance(fds, dict):
        fds = _ext.parse_fd_specs(fds)
    with files.input_image(image) as (fd, name):
        policy = process.RestorePolicy(trust=trusted, any_pid=any_pid, image_owner=files.owner(fd),
                                       image_name=name)
        with stream.options(verifier=verifier, observer=policy.observe), \
                process.restore_policy(policy), _ext.options(fds=fds), \
                _ext.pty.options(shell_job=shell_job):
            return restore.restart(fd, any_pid=any_pid, name=name, images_dir=images_dir)


def stay_parent() -> None:
    """Before a restart that waits for its root (wait_restored): orphans of
    the restore (an `lcr run` image's init) are re-parented to the caller."""
    from linuxcr.engine import foreground
    foreground.become_subreaper()


def wait_restored(pid: int, *, shell_job: bool = False, note=None) -> int:
    """Stay until restored root ``pid`` ends, forwarding signals to it
    (with ``shell_job``: in the foreground of the caller's terminal, job
    control through the caller); returns the exit code the caller should
    exit with (a root killed by a signal: the caller is killed by it too)."""
    from linuxcr.engine import foreground
    tty = foreground.shell_tty() if shell_job else None
    try:
        o = foreground.wait(pid, tty=tty)
    finally:
        if tty is not None:
            os.close(tty)
    if o.note and note is not None:
        note(o.note)
    return foreground.die_like(o)


def show(image: Target, *, verify: KeyArg = None) -> dict:
    """What ``image`` holds (``lcr show``); reads and checks all of it, and
    its signatures with ``verify``."""
    from linuxcr.image import sign as _sign
    from linuxcr.image import stream
    from linuxcr.image.show import summarize
    verifier = _key(verify, signing=False)
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
    pid = _pid(pid)
    return dump.check_tree(pid) if tree else dump.check_process(pid)


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
    pid = _pid(pid)
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


def run(argv: list[str], *, log: str | None = None, cwd: str | None = None) -> int:
    """Start argv under a small init (pid 1 of a fresh pid namespace, which
    forwards signals to argv and exits with its status), detached, ready to
    be checkpointed as a whole tree; returns the init's pid.  Output goes to
    ``log``, or to the default log (run_logged)."""
    return run_logged(argv, log=log, cwd=cwd)[0]


def run_logged(argv: list[str], *, log: str | None = None, cwd: str | None = None
               ) -> tuple[int, str]:
    """As run(); also returns where the output goes.  Without ``log``:
    <default_log_dir>/<pid>.log (engine/run_init.py), never the caller's
    stdout/stderr (`pid=$(lcr run -- CMD)` must not wait for CMD)."""
    from linuxcr.engine import run_init, spawn
    if not argv:
        raise LcrError("nothing to run")
    if log is not None:
        return spawn.run_in_namespace(list(argv), log, cwd), log
    import tempfile
    d = run_init.default_log_dir()
    fd, tmp = tempfile.mkstemp(prefix=".starting-", suffix=".log", dir=d)
    os.close(fd)
    try:
        pid = spawn.run_in_namespace(list(argv), tmp, cwd)
    except BaseException:
        os.unlink(tmp)
        raise
    final = os.path.join(d, f"{pid}.log")
    os.replace(tmp, final)          # the command holds it open: renaming is harmless
    return pid, final


__all__ = ["checkpoint", "restart", "restart_full", "check", "run", "LcrError"]


# --- in-memory checkpoints (crid snapshots, held by the per-user agent) -----

def snapshot(pid: int):
    """Snapshot process ``pid`` in memory (copy-on-write); returns a handle
    with .crid, .writeback(out), .rollback(), .discard()."""
    from linuxcr import agent
    return agent.snapshot(_pid(pid))


def snapshots(pid: int | None = None) -> list[dict]:
    """The snapshots you may use (of ``pid`` only, if given)."""
    from linuxcr import agent
    return agent.snapshots(None if pid is None else _pid(pid))


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


def checkpoint_low_downtime(pid: int, out: Target, *, leave_running: bool = False,
                            compress: bool = False, progress=None) -> dump.DumpResult:
    """checkpoint() frozen only for a copy-on-write snapshot: the image is
    written from the snapshot while the process runs on (lcr itself holds
    the snapshot; no agent).  Then the process is killed unless leave_running."""
    import time
    from linuxcr.engine import dump
    from linuxcr.engine import snapshots as snaps
    pid = _pid(pid)
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
