"""Public Python API (what the CLI calls).

    linuxcr.checkpoint(pid, "app.img")            # or an open fd / file object
    pid = linuxcr.restart("app.img")
    reasons = linuxcr.check(pid)                  # [] when checkpointable
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Union

from linuxcr import faults
from linuxcr.errors import (ImageError, ImageNotFound, ImageWriteError, LcrError, NoSuchProcess,
                            NotCheckpointable, PermissionDenied, Reason, UsageError,
                            group_reasons)
from linuxcr.image import files
from linuxcr.results import (CheckpointResult, CheckResult, DiscardResult, RestartResult,
                             RollbackResult, SnapshotInfo, Tracking, WritebackResult)

# The engine, image and resource modules are imported in the functions that
# use them: `lcr restart` need not import the dump engine, `lcr check` not the
# image writer, `lcr --version` none of them (start-up time, tests/test_startup.py).
if TYPE_CHECKING:
    from linuxcr.engine import dump, incremental, restore
    from linuxcr.image import sign as _sign

    from linuxcr.agent.client import Snapshot, Transaction

KeyArg = Union[str, "os.PathLike[str]", "_sign.Key", None]
Progress = Callable[[int], None]      # called with the bytes just written

Target = files.Target


def _input(image: Target) -> ContextManager[tuple[int, str]]:
    """files.input_image, with a missing file told apart (ImageNotFound, its
    own exit code) from one that exists and cannot be read or is corrupt;
    a terminal on standard input refused (it would wait for typing)."""
    if isinstance(image, int) and os.isatty(image):
        raise UsageError("refusing to read an image from a terminal",
                       "give a file, or pipe the image in: lcr checkpoint PID -o - | lcr restart -")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.lexists(path):
            raise ImageNotFound(f"{path}: no such image file")
    return files.input_image(image)


def as_pid(pid: object) -> int:
    """``pid`` as a process id (> 0), or NoSuchProcess."""
    try:
        p = int(pid)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise NoSuchProcess(f"{pid!r} is not a process id") from None
    if not isinstance(p, int) or p <= 0:
        raise NoSuchProcess(f"{p} is not a process id")
    return p


def load_key(key: KeyArg, *, signing: bool) -> _sign.Key | None:
    """The key of --sign/--verify (None: none); KeyFileError if unusable."""
    if key is None:
        return None
    from linuxcr.image import sign as _sign
    return _sign.load_key(key, signing=signing)


def checkpoint(pid: int, out: Target, *, leave_running: bool = False, compress: bool = False,
               progress: Progress | None = None, sign: KeyArg = None,
               parent: str | os.PathLike[str] | None = None,
               track: bool = False, images_dir: str | None = None,
               trackers: incremental.Trackers | None = None,
               overwrite: bool = True, external: bool = False,
               shell_job: bool = False) -> CheckpointResult:
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
    tree) is saved as external (restart with ``shell_job``).
    ``overwrite``: replace an existing file at ``out`` (atomically, once the
    image is complete); False refuses it (`lcr checkpoint` without --force)."""
    from linuxcr.engine import incremental
    from linuxcr.image import stream
    from linuxcr.image.chain import Chain
    from linuxcr.resources import external as _ext
    from linuxcr.resources.fdkinds import pty as _pty
    pid = as_pid(pid)
    whole = _whole_refusal(pid)
    if whole is not None:
        raise NotCheckpointable(pid, [whole])
    signer = load_key(sign, signing=True)       # a bad key fails before the process is touched
    parent = os.fspath(parent) if parent is not None else None
    if parent is not None and not isinstance(out, int) and not hasattr(out, "fileno") \
            and os.path.exists(os.fspath(out)) and os.path.exists(parent) \
            and os.path.samefile(os.fspath(out), parent):
        raise ImageWriteError(f"{parent} cannot be both the parent and the new image")
    # the agent lends its trackers for this checkpoint only when the caller
    # holds none (--interval holds its own across checkpoints)
    lent = trackers is None and (track or bool(parent)) and (leave_running or bool(parent))
    with files.output_image(out, overwrite=overwrite) as (fd, name, commit), \
            stream.options(signer=signer), _ext.options(record=external), \
            _pty.options(shell_job=shell_job):
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
    if lent and leave_running and trackers is not None:
        give_trackers(trackers, res.image_id.hex())   # counting from this image on
        res.warnings += trackers.warnings
    return _checkpoint_result(res, out)


def _image_name(out: Target) -> str:
    if isinstance(out, int):
        return "-" if out == 1 else f"fd {out}"
    if isinstance(out, (str, os.PathLike)):
        return str(os.fspath(out))
    return str(getattr(out, "name", "image"))


def _checkpoint_result(res: dump.DumpResult, out: Target) -> CheckpointResult:
    return CheckpointResult(pid=res.pid, image=_image_name(out), image_id=res.image_id,
                            pages=res.pages, bytes_written=res.bytes_written,
                            seconds=res.seconds, frozen_seconds=res.frozen_seconds,
                            processes=res.processes, warnings=tuple(res.warnings),
                            incremental=dict(res.incremental), digest=res.digest)


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
                 trust: Iterable[str] | str = (), images_dir: str | None = None,
                 fds: dict[int, str] | Iterable[str] | None = None,
                 shell_job: bool = False, lazy: bool = False,
                 lazy_log: str | None = None) -> RestartResult:
    """As restart(); an incremental image finds its parents beside it (the
    paths it recorded), or in ``images_dir``.  ``fds``: {N: "PATH" | "-" |
    "&M"}, the new file of each external fd N (resources/external.py), or
    the CLI's ["N=PATH", ...].  ``lazy``: return once the process runs; a
    page server (its log: ``lazy_log``) fills its private anonymous memory
    on fault and in the background (docs/lazy.md); the image must be a file."""
    from linuxcr.engine import restore
    from linuxcr.image import stream
    from linuxcr.resources import external as _ext
    from linuxcr.resources.fdkinds import pty as _pty
    from linuxcr.resources import process
    if any_pid:
        _check_any_pid()
    verifier = load_key(verify, signing=False)
    trusted = process.parse_trust(trust)
    if fds is not None and not isinstance(fds, dict):
        fds = _ext.parse_fd_specs(fds)
    # Who could have written the image and each parent is noted as each is
    # opened (image/source.py); a good signature stands for root's own.
    policy = process.RestorePolicy(trust=trusted, any_pid=any_pid, verified=verifier is not None)
    with files.watch_sources(policy.add_source), _input(image) as (fd, name):
        policy.image_name = name
        with stream.options(verifier=verifier, observer=policy.observe), \
                process.restore_policy(policy), _ext.options(fds=fds), \
                _pty.options(shell_job=shell_job):
            r = restore.restart(fd, any_pid=any_pid, name=name, images_dir=images_dir,
                                lazy=lazy, lazy_log=lazy_log)
    lz = r.lazy
    return RestartResult(pid=r.pid, original_pid=r.original_pid, vpid=r.vpid or r.pid,
                         namespace=r.namespace, processes=r.processes, pages=r.pages,
                         seconds=r.seconds, warnings=tuple(r.warnings),
                         lazy_pages=lz.lazy_pages if lz else 0, lazy_server=lz.server if lz else 0,
                         lazy_watchdog=lz.watchdog if lz else 0, lazy_log=lz.log if lz else "")


def warm() -> None:
    """Import now what checkpoint and restart import when called (the agent
    does, once, so that the workers it forks for handed-off commands start
    with all of it loaded: ~0.1 s of imports a restart would pay each time)."""
    import importlib
    for name in ("linuxcr.engine.dump", "linuxcr.engine.incremental", "linuxcr.engine.restore",
                 "linuxcr.image.stream", "linuxcr.image.chain", "linuxcr.image.sign",
                 "linuxcr.resources.external", "linuxcr.resources.fdkinds.pty",
                 "linuxcr.resources.process", "linuxcr.resources.lazy"):
        importlib.import_module(name)


def stay_parent() -> None:
    """Before a restart that waits for its root (wait_restored): orphans of
    the restore (an `lcr run` image's init) are re-parented to the caller."""
    from linuxcr.engine import foreground
    foreground.become_subreaper()


def wait_restored(pid: int, *, shell_job: bool = False,
                  note: Callable[[str], None] | None = None) -> int:
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


CAP_SYS_ADMIN = 21
CAP_CHECKPOINT_RESTORE = 40


def _check_any_pid() -> None:
    """--any-pid restores in the caller's own pid namespace, where setting
    the process's executable (PR_SET_MM_MAP's exe_fd) needs
    CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) there: an ordinary user lacks
    it, and the restart would fail late (after reading the whole image) with
    EPERM.  Refused up front instead, with the way that works."""
    if os.geteuid() == 0:
        return
    from linuxcr.procfs import read_status
    if read_status(os.getpid()).cap_eff & (1 << CAP_CHECKPOINT_RESTORE | 1 << CAP_SYS_ADMIN):
        return
    raise PermissionDenied(
        "--any-pid needs root (or CAP_CHECKPOINT_RESTORE): only then does the kernel let lcr set "
        "a restored process's memory layout (PR_SET_MM_MAP) in your own pid namespace",
        "restart without --any-pid: the process comes back in a new user+pid namespace of yours, "
        "where its saved pid is free")


def show(image: Target, *, verify: KeyArg = None) -> dict[str, Any]:
    """What ``image`` holds (``lcr show``); reads and checks all of it, and
    its signatures with ``verify``."""
    from linuxcr.image import sign as _sign
    from linuxcr.image import stream
    from linuxcr.image.show import summarize
    verifier = load_key(verify, signing=False)
    with _input(image) as (fd, name), stream.options(verifier=verifier):
        s = summarize(fd, name)
    if verifier is not None:
        s["signature"] = {"verified": True, "alg": verifier.alg,
                          "key_id": _sign.key_id_hex(verifier.key_id)}
    return s


PF_KTHREAD = 0x00200000


def _whole_refusal(pid: int) -> Reason | None:
    """A process that can never be checkpointed, whatever it holds: a kernel
    thread (pid 2 and its children) or the init of lcr's own pid namespace.
    One reason for it, not one per kernel thread below pid 2."""
    from linuxcr.procfs import read_stat
    try:
        st = read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid}: no such process") from None
    except PermissionError:
        return None
    if st.flags & PF_KTHREAD:
        return Reason(pid, "it is a kernel thread (pid 2 and its children belong to the kernel); "
                      "only user-space processes can be checkpointed")
    if pid == 1:
        try:
            same = os.path.samefile("/proc/1/ns/pid", "/proc/self/ns/pid")
        except OSError:       # pid 1 may not be ours to look at: /proc is our namespace's
            same = True
        if same:
            return Reason(1, "it is the init of the pid namespace lcr runs in (the whole system); "
                          "checkpoint a process of it, or a tree started with lcr run")
    return None


def check(pid: int, tree: bool = True) -> list[Reason]:
    """Reasons why ``pid`` (and, with tree, its descendants) cannot be
    checkpointed now ([] if it can), fds that share a reason in one.  First,
    a process left held by a dead agent and its dead guardian."""
    from linuxcr.agent import client
    from linuxcr.engine import dump
    pid = as_pid(pid)
    whole = _whole_refusal(pid)
    if whole is not None:
        return [whole]
    held = client.recovery_notes(pid)       # left held by a dead agent and its dead guardian
    found = held + (dump.check_tree(pid) if tree else
                    [r for r in dump.check_process(pid) if not dump.checkpoint_saves(r)])
    return group_reasons([Reason.parse(pid, r) for r in found])


def migrate(pid: int, host: str, port: int, **kw: Any) -> Any:
    """Live-migrate pid (and its descendants) to ``lcr receive`` at host:port
    (engine/migrate.py); returns a MigrateResult."""
    from linuxcr.engine import migrate as _m
    return _m.migrate(pid, host, port, **kw)


def receive(*args: Any, **kw: Any) -> Any:
    """Accept one migration and restart it here (engine/migrate.py)."""
    from linuxcr.engine import migrate as _m
    return _m.receive(*args, **kw)


def check_full(pid: int, tree: bool = True) -> CheckResult:
    """check() with how incremental checkpoints would find changed pages
    (what `lcr check --json` prints)."""
    reasons = check(pid, tree=tree)
    return CheckResult(pid=as_pid(pid), reasons=tuple(reasons), tracking=tracking(pid))


def tracking(pid: int) -> Tracking:
    """How an incremental checkpoint of pid would find the pages changed since
    its parent: method "uffd-wp-async" | "content-hash", tracked, why (one line)."""
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
        return Tracking(method=dirty.METHOD_UFFD, tracked=True,
                        why=f"the agent holds its write tracker (counting since image {held[:12]}); "
                       "a --parent checkpoint of that image uses it")
    if ok:
        return Tracking(method=dirty.METHOD_HASH, tracked=False,
                        why=f"no write tracker yet; --track starts one ({dirty.METHOD_UFFD} works here), "
                       "and later --parent checkpoints use it")
    return Tracking(method=dirty.METHOD_HASH, tracked=False,
                    why=f"write tracking is not available ({why}): every page is hashed and compared")


def run(argv: list[str], *, log: str | None = None, cwd: str | None = None,
        namespaces: tuple[str, ...] = (), hostname: str | None = None) -> int:
    """Start argv under a small init (pid 1 of a fresh pid namespace, which
    forwards signals to argv and exits with its status), detached, ready to
    be checkpointed as a whole tree; returns the init's pid.  Output goes to
    ``log``, or to the default log (run_logged).  ``namespaces``: more
    namespaces of its own (ipc, uts, net, mnt), made again on restart;
    ``hostname``: its hostname in a uts namespace of its own."""
    return run_logged(argv, log=log, cwd=cwd, namespaces=namespaces, hostname=hostname)[0]


def run_logged(argv: list[str], *, log: str | None = None, cwd: str | None = None,
               namespaces: tuple[str, ...] = (), hostname: str | None = None
               ) -> tuple[int, str]:
    """As run(); also returns where the output goes.  Without ``log``:
    <default_log_dir>/<pid>.log (engine/run_init.py), never the caller's
    stdout/stderr (`pid=$(lcr run -- CMD)` must not wait for CMD)."""
    from linuxcr.engine import run_init, spawn
    from linuxcr.resources import namespaces as ns
    if not argv:
        raise LcrError("nothing to run")
    kinds = set(namespaces) | ({"uts"} if hostname is not None else set())
    extra = sum(ns.FLAGS[k] for k in kinds)
    if log is not None:
        return spawn.run_in_namespace(list(argv), log, cwd, extra, hostname), log
    import tempfile
    d = run_init.default_log_dir()
    fd, tmp = tempfile.mkstemp(prefix=".starting-", suffix=".log", dir=d)
    os.close(fd)
    try:
        pid = spawn.run_in_namespace(list(argv), tmp, cwd, extra, hostname)
    except BaseException:
        os.unlink(tmp)
        raise
    final = os.path.join(d, f"{pid}.log")
    os.replace(tmp, final)          # the command holds it open: renaming is harmless
    return pid, final


__all__ = ["checkpoint", "restart", "restart_full", "check", "run", "LcrError"]


# --- in-memory checkpoints (crid snapshots, held by the per-user agent) -----

def snapshot(pid: int) -> Snapshot:
    """Snapshot process ``pid`` in memory (copy-on-write); returns a handle
    with .crid, .writeback(out), .rollback(), .discard(); as a context
    manager it discards the snapshot on exit (and rolls back first on an
    exception if made with ``rollback_on_error=True``)."""
    from linuxcr import agent
    return agent.snapshot(as_pid(pid))


def snapshots(pid: int | None = None) -> list[SnapshotInfo]:
    """The snapshots you may use (of ``pid`` only, if given)."""
    from linuxcr import agent
    return [SnapshotInfo.from_agent(d)
            for d in agent.snapshots(None if pid is None else as_pid(pid))]


def writeback(crid: str, out: Target, *, compress: bool = False,
              overwrite: bool = True) -> WritebackResult:
    """In-memory checkpoint ``crid`` written out as a normal image."""
    import time
    from linuxcr import agent
    t0 = time.monotonic()
    d = agent.writeback(crid, out, compress=compress, overwrite=overwrite)
    return WritebackResult.from_agent(crid, _image_name(out), d, time.monotonic() - t0)


def rollback(crid: str, *, memory_only: bool = False, full: bool = False) -> RollbackResult:
    """Bring the process (or tree) of ``crid`` back; the result says how:
    ``path`` fast (only the pages written since, known from the write
    tracker) or full, ``pages_copied``, ``pages_dropped``."""
    from linuxcr import agent
    return RollbackResult.from_agent(crid, agent.rollback(crid, memory_only=memory_only, full=full))


def discard(crid: str) -> DiscardResult:
    from linuxcr import agent
    agent.discard(crid)
    return DiscardResult(crid)


def transaction(*, memory_only: bool = False, rollback_on_error: bool = True) -> Transaction:
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
                            compress: bool = False, progress: Progress | None = None,
                            overwrite: bool = True) -> CheckpointResult:
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
        with files.output_image(out, overwrite=overwrite) as (fd, name, commit):
            res = snaps.writeback(snap, fd, compress=compress, name=name, progress=progress)
            commit()
    finally:
        snaps.discard(snap)
    if not leave_running:
        import signal as _signal
        try:
            from linuxcr.procfs import read_stat
            if read_stat(pid).starttime == snap.starttime:
                os.kill(pid, _signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return CheckpointResult(pid=pid, image=_image_name(out), image_id=b"", pages=res["pages"],
                            bytes_written=res["bytes"], seconds=time.monotonic() - t0,
                            frozen_seconds=snap.frozen_seconds)
